//! Where the target lives relative to memtrace: its pid as its own pid
//! namespace numbers it, the namespaces it does not share with memtrace, and
//! whether its root directory is another (a container, a chroot).
//!
//! Every pid memtrace keeps and every pid the BPF side compares is the host's
//! (`bpf_get_current_pid_tgid` gives the initial namespace's ids, and memtrace
//! reads `/proc` in it); the namespace pid is only shown, beside the host pid.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::Serialize;

/// The namespace kinds of `/proc/PID/ns/`, in the order reports list them.
const KINDS: [&str; 7] = ["pid", "mnt", "net", "user", "uts", "ipc", "cgroup"];

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Namespaces {
    /// The pid as the target's own pid namespace numbers it (the last
    /// `NSpid` of `/proc/PID/status`); the host pid when it shares memtrace's.
    /// `None` when the status could not be read.
    pub ns_pid: Option<u32>,
    /// The kinds of namespace the target does not share with memtrace
    /// (`pid`, `mnt`, ...), in [`KINDS`]' order.
    pub own_namespaces: Vec<&'static str>,
    /// Whether its root directory is not memtrace's `/` (a container's root
    /// or a chroot). A mount namespace made by copying memtrace's (`unshare
    /// --mount`) has the same root directory.
    pub own_root: bool,
}

impl Namespaces {
    /// Reads them for `pid` (host pid). What cannot be read is left out: a
    /// namespace link that cannot be compared counts as shared.
    pub fn read(pid: u32) -> Namespaces {
        let proc = format!("/proc/{pid}");
        let ns_pid = std::fs::read_to_string(format!("{proc}/status"))
            .ok()
            .and_then(|s| parse_ns_pid(&s));
        let own_namespaces = KINDS.into_iter().filter(|k| !shares(pid, k)).collect();
        Namespaces {
            ns_pid,
            own_namespaces,
            own_root: own_root(pid),
        }
    }

    /// Whether the target sees another pid than the host's for itself.
    pub fn other_pid(&self, host_pid: u32) -> Option<u32> {
        self.ns_pid.filter(|&p| p != host_pid)
    }

    /// Whether anything about the target differs from memtrace's own view.
    pub fn is_isolated(&self) -> bool {
        !self.own_namespaces.is_empty() || self.own_root
    }
}

/// Whether the paths of `/proc/PID/maps` (and `/proc/PID/exe`) name files
/// under the target's root, as `/proc/PID/root/PATH` reaches them.
///
/// The kernel prints a mapped file's path from the reader's root where the
/// file is under it, else from the root of the file's mount namespace. A
/// container's process (another mount namespace, whose root is the
/// namespace's) gets its own paths; a chrooted one in memtrace's mount
/// namespace gets memtrace's (`/jail/lib/libc.so.6`), which are not under its
/// root. (A chroot inside another mount namespace gets neither: its files
/// are then found through `map_files`, see `ProcessModules`.)
pub fn maps_paths_in_root(pid: u32) -> bool {
    !(shares(pid, "mnt") && own_root(pid))
}

/// Whether the target is in memtrace's namespace of kind `kind`; an
/// unreadable link (the target exited) counts as shared.
pub fn shares(pid: u32, kind: &str) -> bool {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{kind}"));
    let ours = std::fs::read_link(format!("/proc/self/ns/{kind}"));
    !matches!((theirs, ours), (Ok(a), Ok(b)) if a != b)
}

/// Whether the target's root directory is not memtrace's `/`.
fn own_root(pid: u32) -> bool {
    !same_file(Path::new(&format!("/proc/{pid}/root")), Path::new("/"))
}

/// The innermost pid of a `/proc/PID/status` text's `NSpid:` line (one
/// entry per pid namespace, the reader's first). Kernels before 4.1 have no
/// such line: `None`.
pub fn parse_ns_pid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (file_id(a), file_id(b)) {
        (Some(a), Some(b)) => a == b,
        // Unreadable (the target exited): nothing is claimed.
        _ => true,
    }
}

/// The device and inode of `path`, from what the kernel holds: with
/// `AT_STATX_DONT_SYNC` a FUSE filesystem (a rootless container's root) is
/// not asked, so a server that never answers cannot hold memtrace
/// (`process/served.rs`). `/proc/PID/root` itself is a magic link: reaching
/// it looks nothing up in the target's tree.
fn file_id(path: &Path) -> Option<(u32, u32, u64)> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a NUL-terminated path; statx writes one `struct statx` into the zeroed
    // buffer given.
    unsafe {
        let mut st: libc::statx = std::mem::zeroed();
        let flags = libc::AT_STATX_DONT_SYNC;
        (libc::statx(libc::AT_FDCWD, c.as_ptr(), flags, libc::STATX_INO, &mut st) == 0).then_some((
            st.stx_dev_major,
            st.stx_dev_minor,
            st.stx_ino,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_pid_is_the_innermost() {
        let status =
            "Name:\tapp\nTgid:\t4242\nPid:\t4242\nNSpid:\t4242\t17\t1\nNStgid:\t4242\t17\t1\n";
        assert_eq!(parse_ns_pid(status), Some(1));
        assert_eq!(parse_ns_pid("Pid:\t7\nNSpid:\t7\n"), Some(7));
        assert_eq!(parse_ns_pid("Pid:\t7\n"), None);
    }

    #[test]
    fn our_own_process_shares_everything() {
        let me = Namespaces::read(std::process::id());
        assert_eq!(me.ns_pid, Some(std::process::id()));
        assert!(me.own_namespaces.is_empty(), "{me:?}");
        assert!(!me.own_root);
        assert!(!me.is_isolated());
        assert_eq!(me.other_pid(std::process::id()), None);
    }
}
