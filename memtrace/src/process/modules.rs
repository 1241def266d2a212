//! Snapshot of a process's executable mappings with the backing files held open.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::maps::{self, MapEntry, MapsError};
use super::open::{Links, OpenError, Root, open_regular};

/// Identity of a parsed module, used as cache key by the symbolizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ModuleKey {
    /// `(st_dev, st_ino)` of the opened file: the same library seen through different
    /// paths, processes or mount namespaces is parsed once.
    File { dev: u64, ino: u64 },
    /// An in-memory image (the vdso), identified by content.
    Image { hash: u64, len: usize },
}

/// One executable mapping of the target.
#[derive(Clone, Debug)]
pub struct MappedModule {
    /// Path as the target sees it (`/proc/PID/maps`, ` (deleted)` stripped), or `[vdso]`.
    pub path: String,
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    pub inode: u64,
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "shown by the tests' module listings")
    )]
    pub deleted: bool,
    /// The opened file; `None` when it could not be opened (see `open_error`).
    pub file: Option<Arc<File>>,
    pub open_error: Option<String>,
    pub(crate) key: Option<ModuleKey>,
    /// vdso bytes, copied out of the target (it has no file).
    pub(crate) image: Option<Arc<Vec<u8>>>,
    /// The maps line this came from, to recognise it on refresh.
    entry: MapEntry,
}

impl MappedModule {
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    pub fn is_vdso(&self) -> bool {
        self.path == "[vdso]"
    }

    /// Offset in the file (or image) that `addr` corresponds to.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr.wrapping_sub(self.start).wrapping_add(self.offset)
    }

    fn from_file(entry: MapEntry, opened: std::io::Result<File>) -> Self {
        let (file, open_error, key) = match opened {
            Ok(f) => match f.metadata() {
                Ok(md) => {
                    let key = ModuleKey::File {
                        dev: md.dev(),
                        ino: md.ino(),
                    };
                    (Some(Arc::new(f)), None, Some(key))
                }
                Err(e) => (None, Some(format!("fstat: {e}")), None),
            },
            Err(e) => (None, Some(e.to_string()), None),
        };
        MappedModule {
            path: entry.path.clone().unwrap_or_default(),
            start: entry.start,
            end: entry.end,
            offset: entry.offset,
            inode: entry.inode,
            deleted: entry.deleted,
            file,
            open_error,
            key,
            image: None,
            entry,
        }
    }

    fn from_image(entry: MapEntry, image: std::io::Result<Vec<u8>>) -> Self {
        use std::hash::{Hash, Hasher};
        let mut m = Self::from_file(entry, Err(std::io::Error::other("no file")));
        m.open_error = None;
        match image {
            Ok(bytes) => {
                // DefaultHasher::new() uses fixed keys: stable within and across runs.
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                m.key = Some(ModuleKey::Image {
                    hash: h.finish(),
                    len: bytes.len(),
                });
                m.image = Some(Arc::new(bytes));
            }
            Err(e) => m.open_error = Some(format!("reading vdso: {e}")),
        }
        m
    }
}

/// Executable mappings of one process, sorted by address, non-overlapping.
#[derive(Debug)]
pub struct ProcessModules {
    /// The target's root directory, held open: paths are resolved inside it (never
    /// out of it), and it keeps working after the target exited (the fd pins its root
    /// mount), unlike `/proc/PID/root`.
    root_dir: Option<Root>,
    /// The target's root is our own `/` (same directory inode), the common non-container
    /// case: search debug files directly, once.
    root_is_host: bool,
    modules: Vec<MappedModule>,
    last_maps: Option<String>,
}

/// Kernel quirk: `/proc/PID/map_files/*` can only be *opened* with CAP_SYS_ADMIN (or
/// CAP_CHECKPOINT_RESTORE) in the initial user namespace; readlink works for less. It is the
/// only way to reach deleted files and files of other mount namespaces reliably, so try it
/// first and fall back to the path resolved inside the target's root. Either way the file
/// is opened by [`open`](super::open): without blocking, and only if it is a regular file.
fn open_mapping(pid: u32, root: Option<&Root>, e: &MapEntry) -> std::io::Result<File> {
    let mf = format!("/proc/{pid}/map_files/{}", e.map_files_name());
    match open_regular(Path::new(&mf)) {
        Ok(f) => Ok(f),
        // What the mapping is, is not a regular file (a device mapped executable):
        // the path would lead to the same.
        Err(err @ OpenError::Refused(_)) => Err(std::io::Error::other(format!("{mf}: {err}"))),
        Err(OpenError::Io(mf_err)) => {
            // A deleted file's path may now name a different file (package upgrades):
            // never substitute it.
            if e.deleted {
                return Err(std::io::Error::new(
                    mf_err.kind(),
                    format!("{mf}: {mf_err} (file deleted, no fallback)"),
                ));
            }
            let path = Path::new(e.path.as_deref().unwrap_or(""));
            let Some(root) = root else {
                return Err(std::io::Error::new(
                    mf_err.kind(),
                    format!("{mf}: {mf_err}; the target's root is gone"),
                ));
            };
            let shown = root.display(path);
            let f = root.open_file(path, Links::InRoot).map_err(|err| {
                let err = std::io::Error::from(err);
                std::io::Error::new(
                    err.kind(),
                    format!("{mf}: {mf_err}; {}: {err}", shown.display()),
                )
            })?;
            // overlayfs/FUSE can report other inode numbers through the path than in maps,
            // so a mismatch is only logged.
            if let Ok(md) = f.metadata()
                && md.ino() != e.inode
            {
                log::debug!(
                    "{}: inode {} differs from maps inode {}",
                    shown.display(),
                    md.ino(),
                    e.inode
                );
            }
            Ok(f)
        }
    }
}

/// The vdso has no file; copy it out of the target (needs ptrace-attach rights, like
/// `map_files`). It is at most a few pages.
fn read_vdso(pid: u32, e: &MapEntry) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(e.len()).map_err(std::io::Error::other)?;
    if len > 1 << 20 {
        return Err(std::io::Error::other("vdso mapping implausibly large"));
    }
    let mem = open_regular(Path::new(&format!("/proc/{pid}/mem")))?;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, e.start)?;
    Ok(buf)
}

fn wanted(e: &MapEntry) -> bool {
    e.is_exec() && (e.is_file_backed() || e.path.as_deref() == Some("[vdso]"))
}

impl ProcessModules {
    /// Reads `/proc/PID/maps` and opens every executable file-backed mapping (via
    /// `/proc/PID/map_files/<start>-<end>`, falling back to `/proc/PID/root/<path>`), keeping
    /// the files open so stacks can be symbolized after the process exited.
    pub fn capture(pid: u32) -> Result<Self, MapsError> {
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let root_dir = Root::open(&root, &root).ok();
        let root_is_host = root_dir.as_ref().is_some_and(Root::is_host);
        let mut pm = ProcessModules {
            root_dir,
            root_is_host,
            modules: Vec::new(),
            last_maps: None,
        };
        pm.refresh(pid)?;
        Ok(pm)
    }

    /// A copy that holds the same files (and a root handle of its own), to be
    /// refreshed on another thread.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(ProcessModules {
            root_dir: self.root_dir.as_ref().map(Root::try_clone).transpose()?,
            root_is_host: self.root_is_host,
            modules: self.modules.clone(),
            last_maps: self.last_maps.clone(),
        })
    }

    /// Re-reads the maps and adds mappings that are new (dlopen). Mappings that disappeared
    /// are kept so addresses captured before a dlclose still resolve, unless a new mapping
    /// now occupies their range. Returns whether modules were added; when the maps text is
    /// byte-identical to the last read nothing is parsed.
    pub fn refresh(&mut self, pid: u32) -> Result<bool, MapsError> {
        let text = maps::read_maps_text(pid)?;
        if self.last_maps.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let entries = maps::parse_maps(&text)?;
        let root = self.root_dir.take();
        let changed = self.merge(entries, |e| {
            if e.is_file_backed() {
                MappedModule::from_file(e.clone(), open_mapping(pid, root.as_ref(), e))
            } else {
                MappedModule::from_image(e.clone(), read_vdso(pid, e))
            }
        });
        self.root_dir = root;
        self.last_maps = Some(text);
        Ok(changed)
    }

    /// Build from already parsed entries (tests, or maps captured elsewhere); `open` is
    /// called for each executable file-backed entry. The root is `/` (see [`Self::with_root`]).
    /// The vdso cannot be read this way and resolves as unavailable.
    #[cfg(test)]
    pub fn from_entries(
        entries: Vec<MapEntry>,
        mut open: impl FnMut(&MapEntry) -> std::io::Result<File>,
    ) -> Self {
        let mut pm = ProcessModules {
            root_dir: None,
            root_is_host: true,
            modules: Vec::new(),
            last_maps: None,
        };
        pm.merge(entries, |e| {
            if e.is_file_backed() {
                MappedModule::from_file(e.clone(), open(e))
            } else {
                MappedModule::from_image(
                    e.clone(),
                    Err(std::io::Error::other("not captured from a live process")),
                )
            }
        });
        pm
    }

    /// The target's root, as printed (`/proc/PID/root`).
    #[cfg(test)]
    pub fn root(&self) -> &Path {
        self.root_dir.as_ref().map_or(Path::new("/"), Root::shown)
    }

    /// The root that debug files of the target are searched in, for work on another
    /// thread (a duplicate of the held handle, or our `/` when it is the target's);
    /// `None` once it cannot be had (the target's root could not be opened).
    pub(crate) fn search_root(&self) -> Option<Root> {
        if self.root_is_host {
            return Root::host().ok();
        }
        self.root_dir.as_ref().and_then(|r| r.try_clone().ok())
    }

    /// Whether the target's root is our own `/` (its debug directory is ours).
    pub(crate) fn root_is_host(&self) -> bool {
        self.root_is_host
    }

    pub fn modules(&self) -> &[MappedModule] {
        &self.modules
    }

    pub fn module_for(&self, addr: u64) -> Option<&MappedModule> {
        let i = self.modules.partition_point(|m| m.start <= addr);
        let m = self.modules.get(i.checked_sub(1)?)?;
        m.contains(addr).then_some(m)
    }

    fn merge(
        &mut self,
        entries: Vec<MapEntry>,
        mut make: impl FnMut(&MapEntry) -> MappedModule,
    ) -> bool {
        let mut changed = false;
        for e in entries.into_iter().filter(wanted) {
            if e.is_empty() || self.modules.iter().any(|m| m.entry == e) {
                continue;
            }
            let m = make(&e);
            // A new mapping over an old range (dlclose + dlopen): the new one wins.
            self.modules
                .retain(|o| o.end <= m.start || o.start >= m.end);
            let i = self.modules.partition_point(|o| o.start < m.start);
            self.modules.insert(i, m);
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> Vec<MapEntry> {
        maps::parse_maps(text).unwrap()
    }

    #[test]
    fn from_entries_selects_exec_file_mappings_and_looks_up() {
        let text = "\
1000-2000 r--p 00000000 08:01 10 /bin/a
2000-3000 r-xp 00001000 08:01 10 /bin/a
5000-6000 r-xp 00000000 00:00 0
7000-8000 r-xp 00002000 08:01 11 /lib/b.so (deleted)
9000-a000 r-xp 00000000 00:00 0 [vdso]
";
        let mut opened = Vec::new();
        let pm = ProcessModules::from_entries(entries(text), |e| {
            opened.push(e.path.clone().unwrap());
            Err(std::io::Error::from(std::io::ErrorKind::NotFound))
        });
        assert_eq!(opened, ["/bin/a", "/lib/b.so"]);
        assert_eq!(pm.modules().len(), 3);
        assert!(
            pm.module_for(0x1fff).is_none(),
            "non-exec mapping not captured"
        );
        let a = pm.module_for(0x2000).unwrap();
        assert_eq!((a.path.as_str(), a.file_offset(0x2010)), ("/bin/a", 0x1010));
        assert!(a.file.is_none() && a.open_error.is_some());
        assert!(pm.module_for(0x3000).is_none());
        assert!(
            pm.module_for(0x5500).is_none(),
            "anonymous exec (JIT) not a module"
        );
        let b = pm.module_for(0x7fff).unwrap();
        assert!(b.deleted);
        assert_eq!(b.path, "/lib/b.so");
        assert!(pm.module_for(0x9000).unwrap().is_vdso());
    }

    #[test]
    fn merge_keeps_old_and_replaces_overlaps() {
        let mut pm = ProcessModules::from_entries(
            entries("2000-3000 r-xp 00001000 08:01 10 /bin/a\n7000-8000 r-xp 0 08:01 11 /lib/b.so"),
            |_| Err(std::io::Error::other("x")),
        );
        // b.so unloaded, c.so loaded where b was, d.so elsewhere.
        let changed = pm.merge(
            entries(
                "2000-3000 r-xp 00001000 08:01 10 /bin/a\n\
                 7800-9000 r-xp 0 08:01 12 /lib/c.so\n\
                 b000-c000 r-xp 0 08:01 13 /lib/d.so",
            ),
            |e| MappedModule::from_file(e.clone(), Err(std::io::Error::other("x"))),
        );
        assert!(changed);
        let paths: Vec<_> = pm.modules().iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, ["/bin/a", "/lib/c.so", "/lib/d.so"]);
        assert_eq!(pm.module_for(0x7900).unwrap().path, "/lib/c.so");
        // Unchanged input: nothing added.
        let again = pm.merge(entries("2000-3000 r-xp 00001000 08:01 10 /bin/a"), |e| {
            MappedModule::from_file(e.clone(), Err(std::io::Error::other("x")))
        });
        assert!(!again);
        assert_eq!(pm.modules().len(), 3, "vanished mappings are kept");
    }
}
