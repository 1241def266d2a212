//! The target's own view of its memory, sampled every interval: resident and
//! virtual size from `/proc/PID/status`, anonymous and swapped memory from
//! `/proc/PID/smaps_rollup`, the brk heap from `/proc/PID/maps`, open file
//! descriptors and threads. The parsers are pure; [`read`] does the I/O.
use std::io;

use serde::Serialize;

/// One sample of the process's memory and resources. Sizes in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcStat {
    /// Resident set size (`VmRSS`).
    pub rss_bytes: u64,
    /// Anonymous resident memory (smaps_rollup `Anonymous`, else status
    /// `RssAnon`): where malloc'ed memory lives.
    pub rss_anon_bytes: u64,
    /// Virtual size (`VmSize`).
    pub vm_size_bytes: u64,
    /// Size of the `[heap]` mapping (glibc's main arena, grown with brk).
    /// Memory malloc takes with mmap (large blocks, thread arenas) is not in it.
    pub heap_bytes: Option<u64>,
    /// Swapped-out memory (smaps_rollup `Swap`, else status `VmSwap`).
    pub swap_bytes: Option<u64>,
    /// Open file descriptors (entries of `/proc/PID/fd`).
    pub fds: Option<u64>,
    pub threads: u64,
}

/// Value in bytes of a `Key:   123 kB` line.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let mut it = rest.split_whitespace();
        let v: u64 = it.next()?.parse().ok()?;
        match it.next() {
            Some("kB") => Some(v * 1024),
            None => Some(v),
            _ => None,
        }
    })
}

/// The fields of `/proc/PID/status` (sizes converted to bytes). `None` when
/// the process has no memory of its own any more (a zombie) or the text is not
/// a status file.
pub fn parse_status(text: &str) -> Option<ProcStat> {
    Some(ProcStat {
        rss_bytes: kb_field(text, "VmRSS")?,
        rss_anon_bytes: kb_field(text, "RssAnon").unwrap_or(0),
        vm_size_bytes: kb_field(text, "VmSize")?,
        heap_bytes: None,
        swap_bytes: kb_field(text, "VmSwap"),
        fds: None,
        threads: kb_field(text, "Threads")?,
    })
}

/// (`Anonymous`, `Swap`) of `/proc/PID/smaps_rollup`, in bytes.
pub fn parse_smaps_rollup(text: &str) -> (Option<u64>, Option<u64>) {
    (kb_field(text, "Anonymous"), kb_field(text, "Swap"))
}

/// Total size of the `[heap]` mappings in `/proc/PID/maps`; 0 if there is none
/// (nothing was ever allocated with brk).
pub fn parse_heap(maps: &str) -> u64 {
    maps.lines()
        .filter(|l| l.split_whitespace().nth(5) == Some("[heap]"))
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            let a = u64::from_str_radix(a, 16).ok()?;
            let b = u64::from_str_radix(b, 16).ok()?;
            Some(b.saturating_sub(a))
        })
        .sum()
}

/// Samples process `pid`. Fails if its status cannot be read or it has no
/// memory any more (exited); the other files only fill in what they can.
pub fn read(pid: u32) -> io::Result<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut s = parse_status(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {pid} has no memory (exited)"),
        )
    })?;
    if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        let (anon, swap) = parse_smaps_rollup(&rollup);
        if let Some(a) = anon {
            s.rss_anon_bytes = a;
        }
        if swap.is_some() {
            s.swap_bytes = swap;
        }
    }
    if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        s.heap_bytes = Some(parse_heap(&maps));
    }
    s.fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tapp\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t   12000 kB\n\
        VmSize:\t   11000 kB\nVmRSS:\t    3000 kB\nRssAnon:\t     1200 kB\nRssFile:\t    1800 kB\n\
        VmSwap:\t       4 kB\nThreads:\t3\nSigQ:\t0/1000\n";

    #[test]
    fn status_fields() {
        let s = parse_status(STATUS).unwrap();
        assert_eq!(s.rss_bytes, 3000 * 1024);
        assert_eq!(s.rss_anon_bytes, 1200 * 1024);
        assert_eq!(s.vm_size_bytes, 11000 * 1024);
        assert_eq!(s.swap_bytes, Some(4096));
        assert_eq!(s.threads, 3);
        // A zombie's status has no Vm lines.
        assert_eq!(
            parse_status("Name:\tapp\nState:\tZ (zombie)\nThreads:\t1\n"),
            None
        );
    }

    #[test]
    fn rollup_and_heap() {
        let rollup = "55d0c0a00000-7ffd1c5f3000 ---p 00000000 00:00 0  [rollup]\n\
            Rss:                3000 kB\nPss:                2000 kB\nAnonymous:          1300 kB\n\
            Swap:                  8 kB\n";
        assert_eq!(
            parse_smaps_rollup(rollup),
            (Some(1300 * 1024), Some(8 * 1024))
        );
        let maps = "55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 123 /usr/bin/app\n\
            55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]\n\
            7ffd1c5d2000-7ffd1c5f3000 rw-p 00000000 00:00 0                          [stack]\n";
        assert_eq!(parse_heap(maps), 0x21000);
        assert_eq!(parse_heap(""), 0);
    }

    #[test]
    fn reads_itself() {
        let s = read(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0 && s.vm_size_bytes >= s.rss_bytes, "{s:?}");
        assert!(s.threads >= 1);
        assert!(s.fds.unwrap() >= 1);
    }
}
