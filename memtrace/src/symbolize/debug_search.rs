//! Where a module's separate debug file is: by build id, by `.gnu_debuglink` (GDB's
//! search order, checked by CRC), and the dwz supplementary file `.gnu_debugaltlink`
//! names, first under the target's root, then under the host's debug directory.
//!
//! The names come from the target's files, so they are rules, not paths to open:
//! every candidate is opened by [`crate::process::open`] (inside a root, without
//! blocking, regular files only), and only in the places debug files live:
//!
//! - build id: `/usr/lib/debug/.build-id/xx/yyyy.debug` (the target's, then ours);
//! - `.gnu_debuglink`: a bare file name (no `/`, not `.` or `..`), looked for next to
//!   the module and in its `.debug/` directory — where the file itself must be there,
//!   no symbolic link, since the target may write those directories — and under
//!   `/usr/lib/debug/<module's directory>/`;
//! - `.gnu_debugaltlink`: never the path as named. Its build id is looked up as
//!   above; the named path only if it lies under `/usr/lib/debug` (lexically, no
//!   `..`), resolved inside the target's root, or in ours under our debug directory.
//!
//! Paths under our own debug directory are built from what the target names only
//! after the checks above (hex build ids, a bare file name, the module's directory
//! as the kernel prints it, a relative path without `..`), so they stay in it;
//! symbolic links there are root's own and are followed.
//!
//! Each candidate refused (rather than simply missing) is counted by reason
//! ([`DebugSearch::refused`]) and logged at debug level.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use object::Object;

use super::elf::{Backing, is_debug_info_present, parse_elf};
use crate::process::open::{Links, OpenError, Refusal, Root, lexically_under};

/// Where distributions install separate debug files, in every root.
pub(crate) const STANDARD_DEBUG_DIR: &str = "/usr/lib/debug";

/// Why a debug-file candidate was refused: the keys of
/// [`super::SymbolizeStats::debug_files_refused`] and of the report's
/// `drops.debug_files_refused`.
pub(crate) mod refusal {
    /// A FIFO, device, directory or socket (never opened for reading).
    pub const NOT_REGULAR: &str = "not_a_regular_file";
    /// A symbolic link next to the module, a magic link, or a link loop.
    pub const SYMLINK: &str = "symlink";
    /// A `.gnu_debugaltlink` path outside `/usr/lib/debug` (or relative).
    pub const ALTLINK_OUTSIDE: &str = "altlink_outside_debug_directories";
    /// A `.gnu_debuglink` that is not a bare file name.
    pub const DEBUGLINK_NOT_BASENAME: &str = "debuglink_not_a_file_name";
    /// On a FUSE mount and larger than the copy limit.
    pub const TOO_LARGE: &str = "larger_than_copy_limit";
}

/// Where to look for separate debug files of one module.
pub(crate) struct DebugSearch<'a> {
    /// The target's root: every target path is resolved inside it. `None` when it
    /// could not be had (nothing of the target's tree is searched then).
    pub target_root: Option<Root>,
    /// Whether the target's own `/usr/lib/debug` is searched (not when its root is
    /// ours: `host_debug_dir` is that directory then).
    pub target_debug: bool,
    /// Our own `/`, where our debug directory's paths resolve (symbolic links in
    /// it are ours, root's: followed, absolute ones included).
    pub host_root: Option<Root>,
    /// Our debug directory (`/usr/lib/debug`).
    pub host_debug_dir: PathBuf,
    /// Path of the binary as the target sees it (from its maps).
    pub binary_path: &'a str,
    /// `(st_dev, st_ino)` of the binary, to never take the binary itself as its debug file.
    pub binary_id: Option<(u64, u64)>,
    /// Candidates refused, by reason (see [`refusal`]).
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

/// One place to try: a path inside a root, how links are treated on the way, and
/// the CRC a debuglink match must have.
pub(super) struct Candidate<'r> {
    root: &'r Root,
    path: PathBuf,
    links: Links,
    crc: Option<u32>,
}

impl<'a> DebugSearch<'a> {
    pub(crate) fn new(
        target_root: Option<Root>,
        target_debug: bool,
        host_debug_dir: &Path,
        binary_path: &'a str,
        binary_id: Option<(u64, u64)>,
    ) -> Self {
        DebugSearch {
            target_root,
            target_debug,
            host_root: Root::host().ok(),
            host_debug_dir: host_debug_dir.to_owned(),
            binary_path,
            binary_id,
            refused: Mutex::new(BTreeMap::new()),
        }
    }

    /// For a file of ours (`memtrace symbolize`, tests): our root is the target's.
    pub(crate) fn host(
        host_debug_dir: &Path,
        binary_path: &'a str,
        binary_id: Option<(u64, u64)>,
    ) -> Self {
        Self::new(
            Root::host().ok(),
            false,
            host_debug_dir,
            binary_path,
            binary_id,
        )
    }

    /// The candidates refused so far, by reason.
    pub(crate) fn refused(&self) -> BTreeMap<&'static str, u64> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn refuse(&self, reason: &'static str, what: &dyn std::fmt::Display) {
        log::debug!(
            "{}: debug file refused ({reason}): {what}",
            self.binary_path
        );
        *self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_insert(0) += 1;
    }

    /// `rel` (a path below the standard debug directory) in the target's debug
    /// directory, then in ours.
    fn in_debug_dirs(&self, rel: &Path, crc: Option<u32>) -> Vec<Candidate<'_>> {
        let mut v = Vec::new();
        if self.target_debug
            && let Some(root) = &self.target_root
        {
            v.push(Candidate {
                root,
                path: Path::new(STANDARD_DEBUG_DIR).join(rel),
                links: Links::InRoot,
                crc,
            });
        }
        if let Some(root) = &self.host_root {
            v.push(Candidate {
                root,
                path: self.host_debug_dir.join(rel),
                links: Links::InRoot,
                crc,
            });
        }
        v
    }

    fn build_id_candidates(&self, id: &[u8], suffix: &str) -> Vec<Candidate<'_>> {
        if id.len() < 2 {
            return Vec::new();
        }
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let rel = format!(".build-id/{}/{}{suffix}", &hex[..2], &hex[2..]);
        self.in_debug_dirs(Path::new(&rel), None)
    }

    /// GDB's documented search order for `.gnu_debuglink`: next to the binary, in `.debug/`
    /// next to it, then under the debug directories mirroring the binary's directory.
    fn debuglink_candidates(&self, name: &str, crc: u32) -> Vec<Candidate<'_>> {
        let bin = Path::new(self.binary_path);
        let dir = bin.parent().unwrap_or(Path::new("/"));
        let mut v = Vec::new();
        if let Some(root) = &self.target_root
            && dir.is_absolute()
        {
            for path in [dir.join(name), dir.join(".debug").join(name)] {
                v.push(Candidate {
                    root,
                    path,
                    links: Links::Refuse,
                    crc: Some(crc),
                });
            }
        }
        let dir_rel = dir.strip_prefix("/").unwrap_or(dir);
        v.extend(self.in_debug_dirs(&dir_rel.join(name), Some(crc)));
        v
    }

    /// Opens a candidate; a refusal is counted, a missing file is not.
    fn open(&self, c: &Candidate<'_>) -> Option<File> {
        match c.root.open_file(&c.path, c.links) {
            Ok(f) => Some(f),
            Err(OpenError::Refused(r)) => {
                let reason = match r {
                    Refusal::NotRegular(_) => refusal::NOT_REGULAR,
                    Refusal::Symlink => refusal::SYMLINK,
                    Refusal::TooLarge => refusal::TOO_LARGE,
                };
                self.refuse(reason, &format_args!("{}: {r}", self.display(c).display()));
                None
            }
            Err(OpenError::Io(_)) => None,
        }
    }

    fn display(&self, c: &Candidate<'_>) -> PathBuf {
        c.root.display(&c.path)
    }

    #[cfg(test)]
    pub(super) fn display_for_tests(&self, c: &Candidate<'_>) -> PathBuf {
        self.display(c)
    }
}

/// Where a debuglink `name` is looked for, as printed.
#[cfg(test)]
pub(super) fn debuglink_candidates_for_tests(search: &DebugSearch<'_>, name: &str) -> Vec<PathBuf> {
    search
        .debuglink_candidates(name, 0)
        .iter()
        .map(|c| search.display(c))
        .collect()
}

/// Standard CRC-32 (IEEE 802.3, reflected), which is what `.gnu_debuglink` stores.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The file's identity; a copy from a FUSE mount has its original's.
fn file_id(f: &File) -> Option<(u64, u64)> {
    crate::process::served::identity(f).ok()
}

/// The separate debug file of a module without `.debug_info` of its own (its path as
/// printed, and the file), and why DWARF will be missing if it is.
pub(super) fn separate_debug_file(
    obj: &object::File<'static>,
    build_id: Option<&[u8]>,
    search: Option<&DebugSearch<'_>>,
    backing: &mut Backing,
) -> (Option<(PathBuf, object::File<'static>)>, Option<String>) {
    let Some(search) = search else {
        return (None, Some("no DWARF".into()));
    };
    match find_debug_file(obj, build_id, search, backing) {
        Some((path, dobj)) => {
            let note = (!is_debug_info_present(&dobj))
                .then(|| "debug file has no .debug_info".to_string());
            (Some((path, dobj)), note)
        }
        None => (
            None,
            Some("no DWARF and no separate debug file found".into()),
        ),
    }
}

/// Checks that `dobj` belongs to the binary: build ids must match when both have one;
/// otherwise, for debuglink matches, the CRC must match.
fn debug_file_matches(
    bin_build_id: Option<&[u8]>,
    dobj: &object::File<'_>,
    data: &[u8],
    crc: Option<u32>,
) -> bool {
    let dbg_id = dobj.build_id().ok().flatten();
    match (bin_build_id, dbg_id) {
        (Some(a), Some(b)) => a == b,
        _ => match crc {
            Some(crc) => crc32(data) == crc,
            None => true,
        },
    }
}

fn find_debug_file(
    obj: &object::File<'static>,
    build_id: Option<&[u8]>,
    search: &DebugSearch<'_>,
    backing: &mut Backing,
) -> Option<(PathBuf, object::File<'static>)> {
    let mut candidates = Vec::new();
    if let Some(id) = build_id {
        candidates.extend(search.build_id_candidates(id, ".debug"));
    }
    if let Ok(Some((name, crc))) = obj.gnu_debuglink() {
        match std::str::from_utf8(name) {
            Ok(name) if is_file_name(name) => {
                candidates.extend(search.debuglink_candidates(name, crc));
            }
            // A debuglink is a bare file name; anything that walks elsewhere is refused.
            _ => search.refuse(
                refusal::DEBUGLINK_NOT_BASENAME,
                &format_args!(".gnu_debuglink {:?}", String::from_utf8_lossy(name)),
            ),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for c in candidates {
        let shown = search.display(&c);
        if !seen.insert(shown.clone()) {
            continue;
        }
        let Some(f) = search.open(&c) else { continue };
        if search.binary_id.is_some() && file_id(&f) == search.binary_id {
            continue;
        }
        let Ok(data) = backing.map(&f) else { continue };
        match parse_elf(data) {
            Ok(dobj) if debug_file_matches(build_id, &dobj, data, c.crc) => {
                return Some((shown, dobj));
            }
            _ => log::debug!("{}: not a matching debug file", shown.display()),
        }
        // Nothing borrows the rejected candidate any more.
        backing.unmap_last();
    }
    None
}

/// A bare file name: not empty, no `/`, not `.` or `..`.
pub(super) fn is_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

/// `.gnu_debugaltlink` (written by dwz) names a supplementary file holding DWARF shared
/// between several debug files, plus its build id. Debian installs these under
/// `/usr/lib/debug/.dwz/` and also registers them in `.build-id/`. The named path is
/// used only below the standard debug directory (see the module docs).
pub(super) fn find_sup_file(
    alt_path: &[u8],
    alt_id: &[u8],
    search: &DebugSearch<'_>,
    backing: &mut Backing,
) -> Option<(PathBuf, object::File<'static>)> {
    let mut candidates = search.build_id_candidates(alt_id, ".debug");
    candidates.extend(altlink_candidates(alt_path, search));
    let mut seen = std::collections::HashSet::new();
    for c in candidates {
        let shown = search.display(&c);
        if !seen.insert(shown.clone()) {
            continue;
        }
        let Some(f) = search.open(&c) else { continue };
        let Ok(data) = backing.map(&f) else { continue };
        if let Ok(sobj) = parse_elf(data)
            && sobj.build_id().ok().flatten() == Some(alt_id)
        {
            return Some((shown, sobj));
        }
        backing.unmap_last();
    }
    None
}

/// The named path of a `.gnu_debugaltlink`, if it lies under the standard debug
/// directory: in the target's root and in our debug directory. Anything else is
/// refused (and counted) without being looked at.
pub(super) fn altlink_candidates<'s>(
    alt_path: &[u8],
    search: &'s DebugSearch<'_>,
) -> Vec<Candidate<'s>> {
    let named = std::str::from_utf8(alt_path).ok().map(Path::new);
    let debug_dir = Path::new(STANDARD_DEBUG_DIR);
    match named {
        Some(p) if lexically_under(p, debug_dir) => {
            let rel = p.strip_prefix(debug_dir).expect("checked to be under it");
            search.in_debug_dirs(rel, None)
        }
        _ => {
            search.refuse(
                refusal::ALTLINK_OUTSIDE,
                &format_args!(".gnu_debugaltlink {:?}", String::from_utf8_lossy(alt_path)),
            );
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
