//! Parser for `/proc/PID/maps`.
//!
//! Line format (see `show_map_vma()` in the kernel's `fs/proc/task_mmu.c`):
//!
//! ```text
//! 7f3c1a228000-7f3c1a3a0000 r-xp 00028000 fe:01 1835093                    /usr/lib/x86_64-linux-gnu/libc.so.6
//! ```
//!
//! `start-end` and `offset` are hex without `0x`, `dev` is `major:minor` in hex, `inode` is
//! decimal, then the kernel pads with spaces and prints the path (or a pseudo name such as
//! `[heap]`) up to the end of the line. The path is *not* quoted: it may contain spaces, and
//! only `\n` is escaped (as the octal `\012`, via `seq_path(.., "\n")`), which is why a line is
//! always exactly one mapping. A file that was unlinked while mapped gets ` (deleted)`
//! appended by `d_path()`.

use std::path::PathBuf;

/// Permission bits from the second column (`rwxp` / `rwxs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` (MAP_SHARED) rather than `p` (private, copy-on-write).
    pub shared: bool,
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub perms: Perms,
    /// Offset into the file of `start` (page aligned; meaningless for anonymous mappings).
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// Path or pseudo name (`[heap]`, `[vdso]`, `[anon:name]` …), `None` for anonymous
    /// mappings. A ` (deleted)` suffix is removed and reported in [`MapEntry::deleted`].
    pub path: Option<String>,
    /// The kernel marked the path ` (deleted)`: the file was unlinked (or replaced, e.g. by a
    /// package upgrade) after being mapped. The path may now name a *different* file.
    pub deleted: bool,
}

impl MapEntry {
    pub fn is_exec(&self) -> bool {
        self.perms.exec
    }

    /// A mapping of a real file. Pseudo names start with `[`; shared anonymous memory shows
    /// up as `/dev/zero (deleted)` or `/SYSV…` but still has an inode on an internal fs, so
    /// those count as file backed too (they can be opened through `map_files`).
    pub fn is_file_backed(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The file offset that `addr` (inside this mapping) corresponds to.
    #[cfg(test)]
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr.wrapping_sub(self.start).wrapping_add(self.offset)
    }

    /// The `/proc/PID/map_files/` entry name: the kernel formats it with `%lx-%lx`
    /// (lowercase hex, no padding, no `0x`).
    pub fn map_files_name(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("maps line {line}: {reason}: {text:?}")]
    Parse {
        /// 1-based line number.
        line: usize,
        reason: &'static str,
        text: String,
    },
}

const DELETED_SUFFIX: &str = " (deleted)";

/// Parse the whole text of a maps file. Empty lines are ignored.
pub fn parse_maps(text: &str) -> Result<Vec<MapEntry>, MapsError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_line(l).map_err(|reason| MapsError::Parse {
                line: i + 1,
                reason,
                text: l.to_owned(),
            })
        })
        .collect()
}

/// Read and parse `/proc/PID/maps`.
pub fn read_maps(pid: u32) -> Result<Vec<MapEntry>, MapsError> {
    let text = read_maps_text(pid)?;
    parse_maps(&text)
}

/// Raw text of `/proc/PID/maps`. Paths are bytes to the kernel; non-UTF-8 bytes are replaced
/// (lossy) because entries carry `String` paths. Opening files via `map_files` does not depend
/// on the path, so that only affects display and the `/proc/PID/root` fallback.
pub fn read_maps_text(pid: u32) -> Result<String, MapsError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let bytes = std::fs::read(&path).map_err(|source| MapsError::Io { path, source })?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Splits off the next space-delimited field (the fixed columns are separated by exactly one
/// space, but be lenient about repeated spaces).
fn next_field<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let s = rest.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    let end = s.find(' ').unwrap_or(s.len());
    let (field, tail) = s.split_at(end);
    *rest = tail;
    Some(field)
}

fn hex(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn parse_line(line: &str) -> Result<MapEntry, &'static str> {
    let mut rest = line;
    let range = next_field(&mut rest).ok_or("missing address range")?;
    let (start, end) = range.split_once('-').ok_or("address range without '-'")?;
    let start = hex(start).ok_or("bad start address")?;
    let end = hex(end).ok_or("bad end address")?;
    if end < start {
        return Err("end address below start");
    }

    let perms = next_field(&mut rest).ok_or("missing permissions")?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err("permissions must be 4 characters");
    }
    let flag = |c: u8, yes: u8| match c {
        b'-' => Ok(false),
        c if c == yes => Ok(true),
        _ => Err("bad permission character"),
    };
    let perms = Perms {
        read: flag(p[0], b'r')?,
        write: flag(p[1], b'w')?,
        exec: flag(p[2], b'x')?,
        shared: match p[3] {
            b's' => true,
            b'p' => false,
            _ => return Err("bad sharing flag (want 'p' or 's')"),
        },
    };

    let offset = hex(next_field(&mut rest).ok_or("missing offset")?).ok_or("bad offset")?;

    let dev = next_field(&mut rest).ok_or("missing device")?;
    let (maj, min) = dev.split_once(':').ok_or("device without ':'")?;
    let dev_major = u32::from_str_radix(maj, 16).map_err(|_| "bad device major")?;
    let dev_minor = u32::from_str_radix(min, 16).map_err(|_| "bad device minor")?;

    let inode = next_field(&mut rest)
        .ok_or("missing inode")?
        .parse::<u64>()
        .map_err(|_| "bad inode")?;

    // Everything after the padding is the path, spaces included. Only the padding is
    // stripped: a trailing space can be part of a file name.
    let raw = rest.trim_start_matches(' ');
    let (path, deleted) = if raw.is_empty() {
        (None, false)
    } else {
        let (p, deleted) = match raw.strip_suffix(DELETED_SUFFIX) {
            Some(p) => (p, true),
            None => (raw, false),
        };
        (Some(p.replace("\\012", "\n")), deleted)
    };

    Ok(MapEntry {
        start,
        end,
        perms,
        offset,
        dev_major,
        dev_minor,
        inode,
        path,
        deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c6a00000-55d0c6a02000 r--p 00000000 fe:01 1315034                    /usr/bin/cat
55d0c6a02000-55d0c6a07000 r-xp 00002000 fe:01 1315034                    /usr/bin/cat
55d0c7e1e000-55d0c7e3f000 rw-p 00000000 00:00 0                          [heap]
7f2a6c000000-7f2a6c021000 rw-p 00000000 00:00 0 
7f2a6e228000-7f2a6e3a0000 r-xp 00026000 fe:01 1835093                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f2a6e400000-7f2a6e401000 r-xp 00001000 00:1f 4242                       /tmp/my dir/lib with  spaces.so (deleted)
7f2a6e500000-7f2a6e501000 rw-s 00000000 00:01 77                         /dev/zero (deleted)
7f2a6e600000-7f2a6e601000 r--p 00000000 00:00 0                          [anon:glibc.malloc]
7ffd5b9d8000-7ffd5b9f9000 rw-p 00000000 00:00 0                          [stack]
7ffd5b9fc000-7ffd5ba00000 r--p 00000000 00:00 0                          [vvar]
7ffd5ba00000-7ffd5ba02000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_real_looking_maps() {
        let e = parse_maps(SAMPLE).unwrap();
        assert_eq!(e.len(), 12);

        let cat = &e[1];
        assert_eq!(
            (cat.start, cat.end, cat.offset),
            (0x55d0c6a02000, 0x55d0c6a07000, 0x2000)
        );
        assert!(cat.is_exec() && cat.is_file_backed() && !cat.deleted);
        assert_eq!(
            (cat.dev_major, cat.dev_minor, cat.inode),
            (0xfe, 1, 1315034)
        );
        assert_eq!(cat.path.as_deref(), Some("/usr/bin/cat"));
        assert_eq!(cat.map_files_name(), "55d0c6a02000-55d0c6a07000");
        assert_eq!(cat.file_offset(0x55d0c6a02010), 0x2010);

        let heap = &e[2];
        assert_eq!(heap.path.as_deref(), Some("[heap]"));
        assert!(!heap.is_file_backed() && !heap.is_exec());
        assert_eq!(
            heap.perms,
            Perms {
                read: true,
                write: true,
                exec: false,
                shared: false
            }
        );

        // Anonymous: nothing (or only padding) after the inode.
        assert_eq!(e[3].path, None);
        assert!(!e[3].is_file_backed());

        let spaced = &e[5];
        assert_eq!(
            spaced.path.as_deref(),
            Some("/tmp/my dir/lib with  spaces.so")
        );
        assert!(spaced.deleted && spaced.is_file_backed() && spaced.is_exec());
        assert_eq!(spaced.dev_minor, 0x1f);

        let shm = &e[6];
        assert!(shm.perms.shared && shm.deleted && shm.is_file_backed());
        assert_eq!(shm.path.as_deref(), Some("/dev/zero"));

        assert_eq!(e[7].path.as_deref(), Some("[anon:glibc.malloc]"));
        let vdso = &e[10];
        assert!(vdso.is_exec() && !vdso.is_file_backed());
        assert_eq!(vdso.path.as_deref(), Some("[vdso]"));
        let vsys = &e[11];
        assert_eq!(vsys.start, 0xffffffffff600000);
        assert!(vsys.perms.exec && !vsys.perms.read);
    }

    #[test]
    fn escaped_newline_and_trailing_space() {
        let e = parse_maps("1000-2000 r-xp 00000000 08:01 5 /a\\012b /c \n").unwrap();
        assert_eq!(e[0].path.as_deref(), Some("/a\nb /c "));
    }

    #[test]
    fn large_device_numbers() {
        let e = parse_maps("1000-2000 r--p 00000000 103:1a 5 /x").unwrap();
        assert_eq!((e[0].dev_major, e[0].dev_minor), (0x103, 0x1a));
    }

    #[test]
    fn errors_carry_line_numbers() {
        let bad = [
            (
                "1000-2000 r-xp 0 08:01 5 /ok\nzzzz-2000 r-xp 0 08:01 5 /x",
                2,
                "bad start address",
            ),
            ("1000 r-xp 0 08:01 5 /x", 1, "address range without '-'"),
            ("2000-1000 r-xp 0 08:01 5 /x", 1, "end address below start"),
            (
                "\n\n1000-2000 rwx 0 08:01 5 /x",
                3,
                "permissions must be 4 characters",
            ),
            (
                "1000-2000 r-xq 0 08:01 5 /x",
                1,
                "bad sharing flag (want 'p' or 's')",
            ),
            ("1000-2000 rzxp 0 08:01 5 /x", 1, "bad permission character"),
            ("1000-2000 r-xp 0 0801 5 /x", 1, "device without ':'"),
            ("1000-2000 r-xp 0 08:01 five /x", 1, "bad inode"),
            ("1000-2000 r-xp 0 08:01", 1, "missing inode"),
            ("1000-2000 r-xp", 1, "missing offset"),
        ];
        for (text, line, reason) in bad {
            match parse_maps(text) {
                Err(MapsError::Parse {
                    line: l, reason: r, ..
                }) => {
                    assert_eq!((l, r), (line, reason), "{text:?}")
                }
                other => panic!("{text:?}: expected parse error, got {other:?}"),
            }
        }
        let msg = parse_maps("x").unwrap_err().to_string();
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn reads_own_maps() {
        let e = read_maps(std::process::id()).unwrap();
        assert!(e.iter().any(|m| m.is_exec() && m.is_file_backed()));
        assert!(e.iter().any(|m| m.path.as_deref() == Some("[stack]")));
        assert!(matches!(read_maps(u32::MAX), Err(MapsError::Io { .. })));
    }
}
