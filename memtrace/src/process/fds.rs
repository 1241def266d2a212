//! The target's open file descriptors by kind, from the links in
//! `/proc/PID/fd` (`socket:[123]`, `pipe:[45]`, `anon_inode:[eventfd]`,
//! a path): a bounded set of kinds, for metrics labels.
use std::{collections::BTreeMap, fs};

/// The kind of one fd from its `/proc/PID/fd/N` link.
pub fn fd_kind(link: &str) -> &'static str {
    if link.starts_with("socket:") {
        "socket"
    } else if link.starts_with("pipe:") {
        "pipe"
    } else if let Some(anon) = link.strip_prefix("anon_inode:") {
        match anon.trim_matches(|c| c == '[' || c == ']') {
            "eventfd" => "eventfd",
            "eventpoll" => "epoll",
            "timerfd" => "timerfd",
            "signalfd" => "signalfd",
            "inotify" => "inotify",
            "pidfd" => "pidfd",
            "bpf-map" | "bpf-prog" | "bpf_link" => "bpf",
            "io_uring" => "io_uring",
            _ => "anon_inode",
        }
    } else if link.starts_with("/memfd:") {
        "memfd"
    } else if link.starts_with("/dev/") {
        "device"
    } else if link.starts_with('/') {
        "file"
    } else {
        "other"
    }
}

/// How many fds of each kind `pid` has open; None if its fd table cannot be
/// read (it exited, or another user namespace hides it).
pub fn fd_kinds(pid: u32) -> Option<BTreeMap<&'static str, u64>> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut kinds = BTreeMap::new();
    for entry in dir.flatten() {
        // An fd closed since the directory was read has no link: skip it.
        let Ok(link) = fs::read_link(entry.path()) else {
            continue;
        };
        *kinds.entry(fd_kind(&link.to_string_lossy())).or_default() += 1;
    }
    Some(kinds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_links() {
        for (link, kind) in [
            ("socket:[26054]", "socket"),
            ("pipe:[12]", "pipe"),
            ("anon_inode:[eventfd]", "eventfd"),
            ("anon_inode:[eventpoll]", "epoll"),
            ("anon_inode:[timerfd]", "timerfd"),
            ("anon_inode:inotify", "inotify"),
            ("anon_inode:[something-new]", "anon_inode"),
            ("/memfd:cache (deleted)", "memfd"),
            ("/dev/null", "device"),
            ("/var/log/app.log", "file"),
            ("net:[4026531840]", "other"),
        ] {
            assert_eq!(fd_kind(link), kind, "{link}");
        }
    }

    #[test]
    fn own_fds() {
        let _f = std::fs::File::open("/proc/self/status").unwrap();
        let kinds = fd_kinds(std::process::id()).unwrap();
        assert!(kinds.get("file").copied().unwrap_or(0) >= 1, "{kinds:?}");
    }
}
