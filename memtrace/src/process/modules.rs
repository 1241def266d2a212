//! A process's executable mappings with the backing files held open, and when
//! each was seen: a stack is resolved in the mappings of the code generation it
//! was taken in (see [`ProcessModules::module_at`]), never in whatever is mapped
//! at its addresses now.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
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
    /// The reads of the maps that saw it, one per era of its range (a read in
    /// the same era as the last one adds nothing).
    sightings: Vec<Sighting>,
}

/// A read of the target's maps: the code generations before and after it.
/// What it saw was mapped at some moment of generation `lo..=hi`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sighting {
    pub lo: Generation,
    pub hi: Generation,
}

/// A code generation: how many times code of the target was unmapped (as the
/// kernel side counts them, see `memtrace_common::CodeState`) when a stack
/// was taken or the maps were read.
pub type Generation = u64;

/// Code of the target unmapped while traced: from `generation` on, what was
/// mapped in `start..end` is gone (something else may be mapped there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmapped {
    pub generation: Generation,
    pub start: u64,
    pub end: u64,
}

impl Unmapped {
    /// An unmapping whose range is not known (its log entry was lost): it
    /// may have been anything.
    pub fn anything(generation: Generation) -> Self {
        Unmapped {
            generation,
            start: 0,
            end: u64::MAX,
        }
    }

    fn covers(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

/// Which mapping held an address when a stack was taken.
#[derive(Debug)]
pub enum Lookup<'a> {
    Module(&'a MappedModule),
    /// No mapping memtrace saw ever held it.
    Unmapped,
    /// A mapping memtrace never saw held it: other mappings were seen there, but
    /// not in the stack's generation (loaded and unloaded between two reads).
    Unseen,
    /// Mappings of different files were seen there in the stack's generation
    /// (the unmappings between them were not all seen).
    Ambiguous,
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
            // A copy from a FUSE mount is known by its original's identity.
            Ok(f) => match super::served::identity(&f) {
                Ok((dev, ino)) => {
                    let key = ModuleKey::File { dev, ino };
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
            sightings: Vec::new(),
        }
    }

    /// What this mapping holds at `addr`: its file (as opened, and as the maps
    /// name it) or image, and the offset in it. Two mappings with the same
    /// identity at an address resolve alike.
    fn identity_at(&self, addr: u64) -> (Option<ModuleKey>, (u32, u32, u64), u64) {
        let e = &self.entry;
        (
            self.key,
            (e.dev_major, e.dev_minor, e.inode),
            self.file_offset(addr),
        )
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

/// Executable mappings of one process: those mapped at the last read of its
/// maps, sorted by address, non-overlapping; those gone since (kept, with their
/// files open, for the stacks taken in them); and the code unmapped while
/// traced, which tells which of them each stack was taken in.
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
    /// Mappings seen once and not in the last read of the maps.
    gone: Vec<MappedModule>,
    /// Code unmapped while traced, by generation.
    unmapped: Vec<Unmapped>,
    /// Every unmapping up to this generation is in `unmapped` (those whose range
    /// is not known, as [`Unmapped::anything`]).
    known_through: Generation,
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
            // never substitute it. A FUSE mount that did not answer is not asked
            // again by the path.
            if e.deleted || mf_err.kind() == std::io::ErrorKind::TimedOut {
                let why = if e.deleted {
                    "file deleted"
                } else {
                    "FUSE mount"
                };
                return Err(std::io::Error::new(
                    mf_err.kind(),
                    format!("{mf}: {mf_err} ({why}, no fallback)"),
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
    let mem = super::mem::TargetMem::open(pid)?;
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
    #[cfg(test)]
    pub fn capture(pid: u32) -> Result<Self, MapsError> {
        Self::capture_at(pid, &mut || 0)
    }

    /// [`Self::capture`], with `generation` the kernel's code generation now.
    pub fn capture_at(
        pid: u32,
        generation: &mut dyn FnMut() -> Generation,
    ) -> Result<Self, MapsError> {
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let root_dir = Root::open(&root, &root).ok();
        let root_is_host = root_dir.as_ref().is_some_and(Root::is_host);
        let mut pm = ProcessModules {
            root_dir,
            root_is_host,
            modules: Vec::new(),
            gone: Vec::new(),
            unmapped: Vec::new(),
            known_through: 0,
            last_maps: None,
        };
        pm.refresh_at(pid, generation)?;
        Ok(pm)
    }

    /// A copy that holds the same files (and a root handle of its own), to be
    /// refreshed on another thread.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(ProcessModules {
            root_dir: self.root_dir.as_ref().map(Root::try_clone).transpose()?,
            root_is_host: self.root_is_host,
            modules: self.modules.clone(),
            gone: self.gone.clone(),
            unmapped: self.unmapped.clone(),
            known_through: self.known_through,
            last_maps: self.last_maps.clone(),
        })
    }

    /// Re-reads the maps and adds mappings that are new (dlopen); those that
    /// disappeared are kept aside for the stacks taken in them. Returns whether
    /// modules were added; when the maps text is byte-identical to the last
    /// read nothing is parsed.
    #[cfg(test)]
    pub fn refresh(&mut self, pid: u32) -> Result<bool, MapsError> {
        self.refresh_at(pid, &mut || 0)
    }

    /// How many times the maps are read while code is being unmapped, for a
    /// read that no unmapping overlaps.
    const READ_TRIES: usize = 3;

    /// [`Self::refresh`], with `generation` the kernel's code generation now.
    /// Unmappings up to the generation before the read should be noted first
    /// ([`Self::note_unmapped`]) for the sightings to be compact.
    pub fn refresh_at(
        &mut self,
        pid: u32,
        generation: &mut dyn FnMut() -> Generation,
    ) -> Result<bool, MapsError> {
        let (text, seen) = Self::read_between(pid, generation)?;
        if self.last_maps.as_deref() == Some(text.as_str()) {
            for i in 0..self.modules.len() {
                self.saw(i, seen);
            }
            return Ok(false);
        }
        let entries = maps::parse_maps(&text)?;
        let root = self.root_dir.take();
        let changed = self.merge(entries, seen, |e| {
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

    /// The maps' text, read between two looks at the code generation; again
    /// (a few times) while code is unmapped meanwhile.
    fn read_between(
        pid: u32,
        generation: &mut dyn FnMut() -> Generation,
    ) -> Result<(String, Sighting), MapsError> {
        let mut tries = 0;
        loop {
            let lo = generation();
            let text = maps::read_maps_text(pid)?;
            let hi = generation();
            tries += 1;
            if lo == hi || tries == Self::READ_TRIES {
                return Ok((text, Sighting { lo, hi }));
            }
        }
    }

    /// Code unmapped while traced, in the order of its generations, up to
    /// `through` (every generation up to it is in `unmapped`, lost ones as
    /// [`Unmapped::anything`]).
    pub fn note_unmapped(
        &mut self,
        unmapped: impl IntoIterator<Item = Unmapped>,
        through: Generation,
    ) {
        self.unmapped.extend(unmapped);
        self.unmapped.sort_by_key(|u| u.generation);
        self.known_through = self.known_through.max(through);
    }

    /// Whether an unmapping that `hits` may have happened in generations
    /// `after + 1 ..= upto` (one not known yet may have been anything).
    fn unmapped_between(
        &self,
        hits: impl Fn(&Unmapped) -> bool,
        after: Generation,
        upto: Generation,
    ) -> bool {
        if upto <= after {
            return false;
        }
        if upto > self.known_through {
            return true;
        }
        let from = self.unmapped.partition_point(|u| u.generation <= after);
        self.unmapped[from..]
            .iter()
            .take_while(|u| u.generation <= upto)
            .any(hits)
    }

    /// Module `i` (of the mapped ones) was in a read of the maps.
    fn saw(&mut self, i: usize, seen: Sighting) {
        let m = &self.modules[i];
        // The last sighting stands for this one if nothing of its range was
        // unmapped between them: both are in one era.
        let same_era = m.sightings.last().is_some_and(|last| {
            !self.unmapped_between(|u| u.overlaps(m.start, m.end), last.lo, seen.hi)
        });
        if !same_era {
            self.modules[i].sightings.push(seen);
        }
    }

    /// Which mapping held `addr` when generation `generation` began or during it: one
    /// seen in a read of the maps with no unmapping of `addr` between that read and
    /// the generation. Mappings that agree on the file and offset at `addr` are one.
    pub fn module_at(&self, addr: u64, generation: Generation) -> Lookup<'_> {
        let mut found: Option<&MappedModule> = None;
        let mut held = false;
        for m in self
            .modules
            .iter()
            .chain(&self.gone)
            .filter(|m| m.contains(addr))
        {
            held = true;
            if !m
                .sightings
                .iter()
                .any(|s| self.held_then(addr, s, generation))
            {
                continue;
            }
            match found {
                Some(f) if f.identity_at(addr) != m.identity_at(addr) => return Lookup::Ambiguous,
                Some(_) => {}
                None => found = Some(m),
            }
        }
        match found {
            Some(m) => Lookup::Module(m),
            None if held => Lookup::Unseen,
            None => Lookup::Unmapped,
        }
    }

    /// Whether what a read saw at `addr` was still (or already) there in
    /// `generation`: nothing at `addr` unmapped from the earlier to the later.
    fn held_then(&self, addr: u64, seen: &Sighting, generation: Generation) -> bool {
        let (after, upto) = (generation.min(seen.lo), generation.max(seen.hi));
        !self.unmapped_between(|u| u.covers(addr), after, upto)
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
            gone: Vec::new(),
            unmapped: Vec::new(),
            known_through: 0,
            last_maps: None,
        };
        pm.merge(entries, Sighting::default(), |e| {
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

    /// The mappings of the last read of the maps.
    pub fn modules(&self) -> &[MappedModule] {
        &self.modules
    }

    /// Every mapping seen, those gone since included.
    #[cfg(test)]
    pub fn all_modules(&self) -> impl Iterator<Item = &MappedModule> {
        self.modules.iter().chain(&self.gone)
    }

    pub fn module_for(&self, addr: u64) -> Option<&MappedModule> {
        let i = self.modules.partition_point(|m| m.start <= addr);
        let m = self.modules.get(i.checked_sub(1)?)?;
        m.contains(addr).then_some(m)
    }

    /// The mappings of a new read of the maps (`seen`) become the mapped ones;
    /// those no longer there go aside. Returns whether any is new (or back).
    fn merge(
        &mut self,
        entries: Vec<MapEntry>,
        seen: Sighting,
        mut make: impl FnMut(&MapEntry) -> MappedModule,
    ) -> bool {
        let mut now: Vec<MapEntry> = entries
            .into_iter()
            .filter(|e| wanted(e) && !e.is_empty())
            .collect();
        now.sort_by_key(|e| e.start);
        let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.modules)
            .into_iter()
            .partition(|m| now.contains(&m.entry));
        self.gone.extend(gone);
        self.modules = kept;
        let mut changed = false;
        for e in now {
            if self.modules.iter().any(|m| m.entry == e) {
                continue;
            }
            // Mapped again as it was (the same file at the same place): the same module.
            let m = match self.gone.iter().position(|m| m.entry == e) {
                Some(i) => self.gone.swap_remove(i),
                None => make(&e),
            };
            changed = true;
            let i = self.modules.partition_point(|o| o.start < m.start);
            self.modules.insert(i, m);
        }
        for i in 0..self.modules.len() {
            self.saw(i, seen);
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

    fn no_file(e: &MapEntry) -> MappedModule {
        MappedModule::from_file(e.clone(), Err(std::io::Error::other("x")))
    }

    #[test]
    fn a_new_read_sets_mappings_aside_and_takes_back_those_mapped_again() {
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
            Sighting::default(),
            no_file,
        );
        assert!(changed);
        let paths: Vec<_> = pm.modules().iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, ["/bin/a", "/lib/c.so", "/lib/d.so"]);
        assert_eq!(pm.module_for(0x7900).unwrap().path, "/lib/c.so");
        assert_eq!(pm.all_modules().count(), 4, "b.so is kept aside");
        // Unchanged input: nothing added.
        let again = pm.merge(
            entries(
                "2000-3000 r-xp 00001000 08:01 10 /bin/a\n\
                 7800-9000 r-xp 0 08:01 12 /lib/c.so\n\
                 b000-c000 r-xp 0 08:01 13 /lib/d.so",
            ),
            Sighting::default(),
            no_file,
        );
        assert!(!again);
        // c.so and d.so unloaded, b.so back where it was: the module kept aside.
        let back = pm.merge(
            entries("2000-3000 r-xp 00001000 08:01 10 /bin/a\n7000-8000 r-xp 0 08:01 11 /lib/b.so"),
            Sighting::default(),
            |_| panic!("b.so is not opened again"),
        );
        assert!(back);
        let paths: Vec<_> = pm.modules().iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, ["/bin/a", "/lib/b.so"]);
        assert_eq!(pm.all_modules().count(), 4);
    }

    const MAIN: &str = "1000-2000 r-xp 00001000 08:01 10 /bin/main\n";
    const ALPHA: &str = "7000-8000 r-xp 00001000 08:01 11 /lib/alpha.so\n";
    const BETA: &str = "7000-8000 r-xp 00001000 08:01 12 /lib/beta.so\n";

    /// The modules after reads of the maps at the given generations, with
    /// code unmapped as given, all known.
    fn timeline(reads: &[(&str, Generation, Generation)], unmapped: &[Unmapped]) -> ProcessModules {
        let mut pm = ProcessModules::from_entries(Vec::new(), |_| unreachable!());
        let last = unmapped.iter().map(|u| u.generation).max().unwrap_or(0);
        let last = reads.iter().map(|r| r.2).max().unwrap_or(0).max(last);
        pm.note_unmapped(unmapped.iter().copied(), last);
        for &(text, lo, hi) in reads {
            pm.merge(entries(text), Sighting { lo, hi }, no_file);
        }
        pm
    }

    fn path(l: Lookup) -> String {
        match l {
            Lookup::Module(m) => m.path.clone(),
            other => format!("{other:?}"),
        }
    }

    fn alpha_unloaded(generation: Generation) -> Unmapped {
        Unmapped {
            generation,
            start: 0x6000,
            end: 0x9000,
        }
    }

    #[test]
    fn a_stack_resolves_in_the_mapping_of_its_generation() {
        let main_alpha = format!("{MAIN}{ALPHA}");
        let main_beta = format!("{MAIN}{BETA}");
        let mut pm = timeline(
            &[(&main_alpha, 0, 0), (&main_beta, 1, 1)],
            &[alpha_unloaded(1)],
        );
        assert_eq!(path(pm.module_at(0x7100, 0)), "/lib/alpha.so");
        assert_eq!(path(pm.module_at(0x7100, 1)), "/lib/beta.so");
        assert_eq!(path(pm.module_at(0x7100, 2)), "Unseen", "not known yet");
        pm.note_unmapped([], 7);
        assert_eq!(path(pm.module_at(0x7100, 7)), "/lib/beta.so");
        // Nothing of main was unmapped: it is main's whatever the generation.
        assert_eq!(path(pm.module_at(0x1100, 0)), "/bin/main");
        assert_eq!(path(pm.module_at(0x1100, 7)), "/bin/main");
        assert_eq!(path(pm.module_at(0x5000, 0)), "Unmapped");
        // Only what is mapped now, by address.
        assert_eq!(pm.module_for(0x7100).unwrap().path, "/lib/beta.so");
    }

    #[test]
    fn a_mapping_no_read_saw_is_never_its_successor() {
        // alpha.so loaded, used and unloaded between two reads (generation 2),
        // beta.so loaded there and seen.
        let main_beta = format!("{MAIN}{BETA}");
        let pm = timeline(&[(MAIN, 0, 0), (&main_beta, 2, 2)], &[alpha_unloaded(2)]);
        assert_eq!(path(pm.module_at(0x7100, 1)), "Unseen");
        assert_eq!(path(pm.module_at(0x7100, 2)), "/lib/beta.so");
        assert_eq!(path(pm.module_at(0x1100, 1)), "/bin/main");
    }

    #[test]
    fn without_the_unmappings_two_files_at_one_address_are_ambiguous() {
        // No unmapping known (the kernel side could not watch them): alpha.so
        // and beta.so were both seen at one address, in one generation.
        let main_alpha = format!("{MAIN}{ALPHA}");
        let main_beta = format!("{MAIN}{BETA}");
        let pm = timeline(&[(&main_alpha, 0, 0), (&main_beta, 0, 0)], &[]);
        assert_eq!(path(pm.module_at(0x7100, 0)), "Ambiguous");
        assert_eq!(path(pm.module_at(0x1100, 0)), "/bin/main");
    }

    #[test]
    fn an_unmapping_not_known_may_have_been_anything() {
        let main_alpha = format!("{MAIN}{ALPHA}");
        let mut pm = timeline(&[(&main_alpha, 0, 0)], &[]);
        // Generation 1 is known, 2 was lost, 3 not read yet.
        pm.note_unmapped([alpha_unloaded(1), Unmapped::anything(2)], 2);
        assert_eq!(path(pm.module_at(0x1100, 0)), "/bin/main");
        assert_eq!(path(pm.module_at(0x1100, 1)), "/bin/main");
        assert_eq!(path(pm.module_at(0x1100, 2)), "Unseen");
        assert_eq!(path(pm.module_at(0x1100, 3)), "Unseen");
        assert_eq!(path(pm.module_at(0x7100, 1)), "Unseen");
    }

    #[test]
    fn a_read_during_an_unmapping_tells_nothing_of_that_address() {
        // The read began in generation 0 and ended in 1: alpha.so may have
        // been seen before or after its range was unmapped.
        let main_alpha = format!("{MAIN}{ALPHA}");
        let pm = timeline(&[(&main_alpha, 0, 1)], &[alpha_unloaded(1)]);
        assert_eq!(path(pm.module_at(0x7100, 0)), "Unseen");
        assert_eq!(path(pm.module_at(0x1100, 0)), "/bin/main");
    }

    #[test]
    fn reads_in_one_era_are_one_sighting() {
        let main_alpha = format!("{MAIN}{ALPHA}");
        let mut pm = timeline(&[(&main_alpha, 0, 0)], &[]);
        pm.note_unmapped([alpha_unloaded(1), alpha_unloaded(2)], 2);
        for g in 0..3 {
            pm.merge(entries(&main_alpha), Sighting { lo: g, hi: g }, no_file);
        }
        let sightings = |p: &str| {
            pm.all_modules()
                .find(|m| m.path == p)
                .map(|m| m.sightings.len())
        };
        assert_eq!(sightings("/bin/main"), Some(1));
        assert_eq!(sightings("/lib/alpha.so"), Some(3), "one per era");
        // alpha.so seen again in each era: it was there in each.
        for g in 0..3 {
            assert_eq!(path(pm.module_at(0x7100, g)), "/lib/alpha.so");
        }
    }
}
