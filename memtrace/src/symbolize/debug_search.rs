//! Where a module's separate debug file is: by build id, by `.gnu_debuglink` (GDB's
//! search order, checked by CRC), and the dwz supplementary file `.gnu_debugaltlink`
//! names, first under the target's root, then under the host's debug directory.

use std::fs::File;
use std::path::{Path, PathBuf};

use object::Object;

use super::elf::{Backing, is_debug_info_present, parse_elf};

/// Where to look for separate debug files of one module.
pub(crate) struct DebugSearch<'a> {
    /// Target's root as seen from here (`/proc/PID/root`, or `/`), used first.
    pub target_root: &'a Path,
    /// How to print paths under `target_root` (`/proc/PID/root` rather than the
    /// `/proc/self/fd/N` actually used).
    pub display_root: &'a Path,
    /// Host debug directory (`/usr/lib/debug`).
    pub debug_root: &'a Path,
    /// Path of the binary as the target sees it (from its maps).
    pub binary_path: &'a str,
    /// `(st_dev, st_ino)` of the binary, to never take the binary itself as its debug file.
    pub binary_id: Option<(u64, u64)>,
}

impl DebugSearch<'_> {
    fn display(&self, p: PathBuf) -> PathBuf {
        if self.target_is_host() {
            return p;
        }
        match p.strip_prefix(self.target_root) {
            Ok(rel) => self.display_root.join(rel),
            Err(_) => p,
        }
    }

    fn in_root(&self, abs: &Path) -> PathBuf {
        let rel = abs.strip_prefix("/").unwrap_or(abs);
        self.target_root.join(rel)
    }

    fn target_is_host(&self) -> bool {
        self.target_root == Path::new("/")
    }

    fn build_id_candidates(&self, id: &[u8], suffix: &str) -> Vec<PathBuf> {
        if id.len() < 2 {
            return Vec::new();
        }
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let rel = format!(".build-id/{}/{}{suffix}", &hex[..2], &hex[2..]);
        let mut v = Vec::new();
        if !self.target_is_host() {
            v.push(self.in_root(Path::new("/usr/lib/debug")).join(&rel));
        }
        v.push(self.debug_root.join(&rel));
        v
    }

    /// GDB's documented search order for `.gnu_debuglink`: next to the binary, in `.debug/`
    /// next to it, then under the global debug directory mirroring the binary's directory.
    fn debuglink_candidates(&self, name: &str) -> Vec<PathBuf> {
        let bin = Path::new(self.binary_path);
        let dir = bin.parent().unwrap_or(Path::new("/"));
        let dir_rel = dir.strip_prefix("/").unwrap_or(dir);
        let mut v = vec![
            self.in_root(dir).join(name),
            self.in_root(dir).join(".debug").join(name),
        ];
        if !self.target_is_host() {
            v.push(
                self.in_root(Path::new("/usr/lib/debug"))
                    .join(dir_rel)
                    .join(name),
            );
        }
        v.push(self.debug_root.join(dir_rel).join(name));
        v
    }
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

fn open_and_map(path: &Path, backing: &mut Backing) -> Option<(File, &'static [u8])> {
    let f = File::open(path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let data = backing.map(&f).ok()?;
    Some((f, data))
}

fn file_id(f: &File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    f.metadata().ok().map(|m| (m.dev(), m.ino()))
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
    let mut candidates: Vec<(PathBuf, Option<u32>)> = Vec::new();
    if let Some(id) = build_id {
        for p in search.build_id_candidates(id, ".debug") {
            candidates.push((p, None));
        }
    }
    // A debuglink is a bare file name; refuse anything that walks elsewhere.
    if let Ok(Some((name, crc))) = obj.gnu_debuglink()
        && let Ok(name) = std::str::from_utf8(name)
        && !name.is_empty()
        && !name.contains('/')
    {
        for p in search.debuglink_candidates(name) {
            candidates.push((p, Some(crc)));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (path, crc) in candidates {
        if !seen.insert(path.clone()) {
            continue;
        }
        let Ok(f) = File::open(&path) else { continue };
        if search.binary_id.is_some() && file_id(&f) == search.binary_id {
            continue;
        }
        let Ok(md) = f.metadata() else { continue };
        if !md.is_file() {
            continue;
        }
        let Ok(data) = backing.map(&f) else { continue };
        match parse_elf(data) {
            Ok(dobj) if debug_file_matches(build_id, &dobj, data, crc) => {
                return Some((search.display(path), dobj));
            }
            _ => log::debug!("{}: not a matching debug file", path.display()),
        }
        // Nothing borrows the rejected candidate any more.
        backing.unmap_last();
    }
    None
}

/// `.gnu_debugaltlink` (written by dwz) names a supplementary file holding DWARF shared
/// between several debug files, plus its build id. Debian installs these under
/// `/usr/lib/debug/.dwz/` and also registers them in `.build-id/`.
pub(super) fn find_sup_file(
    alt_path: &[u8],
    alt_id: &[u8],
    search: &DebugSearch<'_>,
    backing: &mut Backing,
) -> Option<(PathBuf, object::File<'static>)> {
    let mut candidates = search.build_id_candidates(alt_id, ".debug");
    if let Ok(p) = std::str::from_utf8(alt_path) {
        let p = Path::new(p);
        if p.is_absolute() {
            candidates.push(search.in_root(p));
            candidates.push(p.to_path_buf());
        }
    }
    for path in candidates {
        let Some((_, data)) = open_and_map(&path, backing) else {
            continue;
        };
        if let Ok(sobj) = parse_elf(data)
            && sobj.build_id().ok().flatten() == Some(alt_id)
        {
            return Some((search.display(path), sobj));
        }
        backing.unmap_last();
    }
    None
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
