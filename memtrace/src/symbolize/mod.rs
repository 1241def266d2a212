//! User-space stack symbolization.
//!
//! Input: raw addresses from `bpf_get_stack(.., BPF_F_USER_STACK)`, innermost first. Every
//! frame except the innermost one is a *return address*: it points at the instruction after
//! the `call`, which may belong to the next source line, the next inlined scope, or even the
//! next function when the call was the last instruction (calls to `noreturn` functions). So
//! those are looked up at `addr - 1`, while the original address is reported.
//!
//! Pipeline per address: [`ProcessModules`] finds the mapping → file offset → ELF virtual
//! address via the `PT_LOAD` headers → addr2line (DWARF, with inlined frames) → symbol table
//! fallback → demangling. Parsed modules are cached per file identity and results per
//! (module, offset), so a `Symbolizer` should live as long as the tracer.

pub mod addr2line;
mod debug_search;
mod demangle;
mod dies;
mod elf;
mod lines;
pub mod python;
mod sections;
mod stream;
mod symtab;
#[cfg(test)]
mod tests;
mod unit_batch;
mod unit_index;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use crate::process::modules::{Generation, MappedModule, ProcessModules};

use crate::process::modules::{Lookup, ModuleKey};

/// An address of a stack, and the code generation the stack was taken in:
/// the address is resolved in the mapping that held it then (see
/// [`ProcessModules::module_at`]); [`NOW`], in what holds it now.
pub type Taken = (u64, Generation);

/// The generation of addresses to resolve in what is mapped now.
pub const NOW: Generation = Generation::MAX;
#[cfg(test)]
pub(crate) use demangle::demangle;
/// One parsed module; outside this stage only `crate::fuzzing` loads one directly.
pub(crate) use elf::ElfModule;
use elf::{DebugSearch, LoadError};

use crate::process::open::{Root, open_regular};

#[derive(Debug, thiserror::Error)]
pub enum SymbolizeError {
    #[error(transparent)]
    Maps(#[from] crate::process::maps::MapsError),
    /// The file cannot be opened (not a `#[source]`: the message already says it all).
    #[error("{}: {err}", path.display())]
    Open { path: PathBuf, err: std::io::Error },
    #[error("{}: {msg}", path.display())]
    Module { path: PathBuf, msg: String },
}

/// Why (part of) a frame could not be resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Unresolved {
    /// The address is in no captured executable mapping (JIT code, garbage from a broken
    /// frame-pointer chain, or a mapping that appeared after the last refresh).
    Unmapped,
    /// The mapping is known but its file could not be opened (see
    /// [`MappedModule::open_error`]).
    FileUnavailable,
    /// The file is not a usable ELF, or the offset lies in none of its `PT_LOAD` segments
    /// (the file does not match what was mapped).
    Malformed,
    /// No DWARF function and no covering symbol: the function name is unknown.
    NoSymbol,
    /// The function is known but there is no line information.
    NoLineInfo,
    /// The module's debug info was still loading (on a background thread) when the
    /// lookup's deadline passed: nothing of it is known.
    NotLoadedInTime,
    /// The address was in a mapping memtrace never saw: mapped and unmapped again
    /// between two reads of the target's maps (a library loaded and unloaded within a
    /// second). What was mapped there before or after is not used.
    ModuleUnseen,
    /// Mappings of different files were seen at the address and memtrace cannot tell
    /// which the stack was taken in (the unmappings between them were not watched).
    ModuleAmbiguous,
}

/// One symbolized frame. Inlined frames share the `address` of the physical frame.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Frame {
    /// Serialized as a hex string (`"0x401136"`), as in the JSON report.
    #[serde(serialize_with = "hex_address")]
    pub address: u64,
    /// Path as the target sees it (from its maps), `[vdso]` for the vdso.
    pub module: Option<String>,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
    /// A frame of the program's machine code, or of Python code run by the
    /// interpreter (`address` is then the code object's).
    pub kind: FrameKind,
    #[serde(skip)]
    pub unresolved: Option<Unresolved>,
}

/// What a frame is a frame of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    #[default]
    Native,
    Python,
}

impl FrameKind {
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Native => "native",
            FrameKind::Python => "python",
        }
    }
}

fn hex_address<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 18];
    s.serialize_str(hex_str(*v, &mut buf))
}

/// `v` as `0x` and lowercase hex digits, written in `buf`: on the stack, as a
/// report can hold hundreds of thousands of frames.
pub(crate) fn hex_str(v: u64, buf: &mut [u8; 18]) -> &str {
    let mut n = v;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[i - 2..i].copy_from_slice(b"0x");
    std::str::from_utf8(&buf[i - 2..]).expect("hex digits are ASCII")
}

/// The address-independent part of a frame, as cached per (module, offset).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FrameInfo {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
    pub unresolved: Option<Unresolved>,
}

impl FrameInfo {
    fn unresolved(reason: Unresolved) -> Self {
        FrameInfo {
            unresolved: Some(reason),
            ..Default::default()
        }
    }
}

/// Counters; frames are counted as returned (an address with two inlined levels counts 2).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SymbolizeStats {
    pub addresses: u64,
    pub frames: u64,
    /// Addresses answered from the per-(module, offset) result cache.
    pub cache_hits: u64,
    pub modules_loaded: u64,
    pub module_load_failures: u64,
    pub unmapped: u64,
    pub file_unavailable: u64,
    pub malformed: u64,
    pub no_symbol: u64,
    pub no_line_info: u64,
    /// Frames of modules whose debug info was not loaded by the lookup's deadline.
    pub not_loaded_in_time: u64,
    /// Frames in a mapping never seen, or of two that cannot be told apart.
    pub module_unseen: u64,
    pub module_ambiguous: u64,
    /// Lookups that gave up waiting for a module loading in the background.
    pub load_waits_timed_out: u64,
    /// Debug-file candidates refused (not opened, or not read), by reason: see
    /// `debug_search::refusal` for the keys.
    pub debug_files_refused: BTreeMap<&'static str, u64>,
}

impl SymbolizeStats {
    #[cfg(test)]
    pub fn unresolved(&self, reason: Unresolved) -> u64 {
        match reason {
            Unresolved::Unmapped => self.unmapped,
            Unresolved::FileUnavailable => self.file_unavailable,
            Unresolved::Malformed => self.malformed,
            Unresolved::NoSymbol => self.no_symbol,
            Unresolved::NoLineInfo => self.no_line_info,
            Unresolved::NotLoadedInTime => self.not_loaded_in_time,
            Unresolved::ModuleUnseen => self.module_unseen,
            Unresolved::ModuleAmbiguous => self.module_ambiguous,
        }
    }

    fn add_refusals(&mut self, refused: &BTreeMap<&'static str, u64>) {
        for (&k, &n) in refused {
            *self.debug_files_refused.entry(k).or_insert(0) += n;
        }
    }

    /// One module load, as it ended.
    fn count_load(&mut self, r: &Result<ElfModule, LoadError>, path: &str) {
        match r {
            Ok(_) => self.modules_loaded += 1,
            Err(e) => {
                self.module_load_failures += 1;
                log::debug!("{path}: {e}");
            }
        }
    }

    fn count(&mut self, frame: &Frame) {
        self.count_unresolved(frame.unresolved);
    }

    /// One address of a batch and its frames.
    fn count_address(&mut self, frames: &[FrameInfo]) {
        self.addresses += 1;
        for f in frames {
            self.count_unresolved(f.unresolved);
        }
    }

    fn count_unresolved(&mut self, unresolved: Option<Unresolved>) {
        self.frames += 1;
        match unresolved {
            None => {}
            Some(Unresolved::Unmapped) => self.unmapped += 1,
            Some(Unresolved::FileUnavailable) => self.file_unavailable += 1,
            Some(Unresolved::Malformed) => self.malformed += 1,
            Some(Unresolved::NoSymbol) => self.no_symbol += 1,
            Some(Unresolved::NoLineInfo) => self.no_line_info += 1,
            Some(Unresolved::NotLoadedInTime) => self.not_loaded_in_time += 1,
            Some(Unresolved::ModuleUnseen) => self.module_unseen += 1,
            Some(Unresolved::ModuleAmbiguous) => self.module_ambiguous += 1,
        }
    }
}

/// What was found for one module (diagnostics, `--verbose` output, tests).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[cfg(test)]
pub struct ModuleSummary {
    pub path: String,
    /// Lowercase hex GNU build id.
    pub build_id: Option<String>,
    pub debug_file: Option<PathBuf>,
    pub supplementary_file: Option<PathBuf>,
    pub has_dwarf: bool,
    pub symbols: usize,
    /// Bytes mapped or decompressed for this module (files are mmapped, so mostly page cache).
    pub data_bytes: usize,
    /// Why the module or its DWARF is unusable, if it is.
    pub error: Option<String>,
}

/// Symbolizer with caches shared by all processes it is used for.
pub struct Symbolizer {
    debug_root: PathBuf,
    modules: HashMap<ModuleKey, Result<ElfModule, LoadError>>,
    results: HashMap<(ModuleKey, u64), Vec<FrameInfo>>,
    stats: SymbolizeStats,
    /// Modules being loaded on background threads ([`Self::load_in_background`]).
    background: Vec<Background>,
    /// Until when a lookup may wait for a module being loaded in the background
    /// ([`Self::set_deadline`]); without one, each wait is at most [`LOAD_WAIT_LIMIT`].
    deadline: Option<Instant>,
}

/// The longest a lookup waits for a module loading in the background when no
/// deadline was set: a loader stuck for good (a file that never answers) must not
/// stop the caller for good.
pub const LOAD_WAIT_LIMIT: Duration = Duration::from_secs(30);

/// One module as a background thread loaded it: its key, its path (for the log), the
/// module, and the debug-file candidates refused while searching for its debug info.
type Loaded = (
    ModuleKey,
    String,
    Result<ElfModule, LoadError>,
    BTreeMap<&'static str, u64>,
);

/// One background thread's modules: those not received yet, and its channel.
struct Background {
    loading: std::collections::HashSet<ModuleKey>,
    results: std::sync::mpsc::Receiver<Loaded>,
}

/// What loading one module needs, owned, to be done on another thread.
struct LoadJob {
    key: ModuleKey,
    path: String,
    file: Option<std::sync::Arc<std::fs::File>>,
    image: Option<std::sync::Arc<Vec<u8>>>,
    open_error: Option<String>,
    /// The target's root (a handle of its own), that its paths resolve in.
    root: Option<Root>,
    /// Whether the target's root is not ours: its own debug directory is searched too.
    target_debug: bool,
}

impl LoadJob {
    fn new(modules: &ProcessModules, m: &MappedModule, key: ModuleKey) -> Self {
        LoadJob {
            key,
            path: m.path.clone(),
            file: m.file.clone(),
            image: m.image.clone(),
            open_error: m.open_error.clone(),
            root: modules.search_root(),
            target_debug: !modules.root_is_host(),
        }
    }

    /// The module, and the debug-file candidates refused on the way.
    fn load(
        self,
        debug_root: &Path,
    ) -> (Result<ElfModule, LoadError>, BTreeMap<&'static str, u64>) {
        if let Some(image) = &self.image {
            return (
                ElfModule::from_image(image.as_ref().clone()),
                BTreeMap::new(),
            );
        }
        let Some(file) = &self.file else {
            let err = LoadError {
                reason: Unresolved::FileUnavailable,
                msg: self.open_error.clone().unwrap_or_else(|| "no file".into()),
            };
            return (Err(err), BTreeMap::new());
        };
        let binary_id = match self.key {
            ModuleKey::File { dev, ino } => Some((dev, ino)),
            _ => None,
        };
        let search = DebugSearch::new(
            self.root,
            self.target_debug,
            debug_root,
            &self.path,
            binary_id,
        );
        let r = ElfModule::from_file(file, &search);
        (r, search.refused())
    }
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// Host debug directory `/usr/lib/debug` (Debian's `-dbg`/`-dbgsym` packages).
    pub fn new() -> Self {
        Self::with_debug_root("/usr/lib/debug")
    }

    pub fn with_debug_root(path: impl Into<PathBuf>) -> Self {
        Symbolizer {
            debug_root: path.into(),
            modules: HashMap::new(),
            results: HashMap::new(),
            stats: SymbolizeStats::default(),
            background: Vec::new(),
            deadline: None,
        }
    }

    /// Lookups from now on wait for modules loading in the background at most until
    /// `deadline` (with `None`: each at most [`LOAD_WAIT_LIMIT`]). A module not loaded
    /// by then resolves as [`Unresolved::NotLoadedInTime`], and is used once it is.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// The moment the wait that starts now must end.
    fn wait_end(&self) -> Instant {
        self.deadline
            .unwrap_or_else(|| Instant::now() + LOAD_WAIT_LIMIT)
    }

    /// Whether any of the modules holding `addrs` (return addresses, as for
    /// [`Self::load_in_background`]) is still being loaded in the background.
    #[cfg(test)]
    pub fn loading_any(&mut self, modules: &ProcessModules, addrs: &[u64]) -> bool {
        let taken: Vec<Taken> = addrs.iter().map(|&a| (a, NOW)).collect();
        self.loading_any_taken(modules, &taken)
    }

    /// [`Self::loading_any`] for addresses of stacks taken in given generations.
    pub fn loading_any_taken(&mut self, modules: &ProcessModules, addrs: &[Taken]) -> bool {
        self.receive_background(None, Instant::now());
        if self.background.is_empty() {
            return false;
        }
        addrs.iter().any(|&(a, g)| {
            mapping(modules, a.saturating_sub(1), g)
                .ok()
                .and_then(|m| m.key)
                .is_some_and(|k| self.background.iter().any(|b| b.loading.contains(&k)))
        })
    }

    /// Waits until a module loading in the background arrives, or `until`.
    pub fn wait_for_any_load(&mut self, until: Instant) {
        let Some(b) = self.background.first() else {
            return;
        };
        let Some(&key) = b.loading.iter().next() else {
            return;
        };
        self.receive_background(Some(key), until);
    }

    pub fn stats(&self) -> &SymbolizeStats {
        &self.stats
    }

    /// Starts loading, on a background thread, the modules that hold `addrs` (return
    /// addresses: each is looked up at `addr - 1`, as [`Self::symbolize`] does) and are
    /// neither loaded nor being loaded, so that a later report only pays for lookups.
    /// A lookup that needs one of them waits for it. Returns how many were started.
    #[cfg(test)]
    pub fn load_in_background(
        &mut self,
        modules: &ProcessModules,
        addrs: impl IntoIterator<Item = u64>,
    ) -> usize {
        self.load_taken_in_background(modules, addrs.into_iter().map(|a| (a, NOW)))
    }

    /// [`Self::load_in_background`] for addresses of stacks taken in given
    /// generations.
    pub fn load_taken_in_background(
        &mut self,
        modules: &ProcessModules,
        addrs: impl IntoIterator<Item = Taken>,
    ) -> usize {
        let ms = addrs
            .into_iter()
            .filter_map(|(a, g)| mapping(modules, a.saturating_sub(1), g).ok());
        self.load_modules_in_background(modules, ms)
    }

    /// [`Self::load_in_background`] for the given modules of `modules`.
    pub fn load_modules_in_background<'m>(
        &mut self,
        modules: &ProcessModules,
        ms: impl IntoIterator<Item = &'m MappedModule>,
    ) -> usize {
        self.receive_background(None, Instant::now());
        let mut loading = std::collections::HashSet::new();
        let mut jobs = Vec::new();
        for m in ms {
            let Some(key) = m.key else { continue };
            if self.modules.contains_key(&key)
                || self.background.iter().any(|b| b.loading.contains(&key))
                || !loading.insert(key)
            {
                continue;
            }
            jobs.push(LoadJob::new(modules, m, key));
        }
        if jobs.is_empty() {
            return 0;
        }
        let n = jobs.len();
        let (tx, rx) = std::sync::mpsc::channel();
        let debug_root = self.debug_root.clone();
        let started = std::thread::Builder::new()
            .name("symbolize-load".into())
            .spawn(move || {
                for job in jobs {
                    let t = std::time::Instant::now();
                    let (key, path) = (job.key, job.path.clone());
                    let (r, refused) = job.load(&debug_root);
                    log::debug!("{path}: loaded in the background in {:?}", t.elapsed());
                    if tx.send((key, path, r, refused)).is_err() {
                        break;
                    }
                }
            });
        if started.is_err() {
            return 0; // loaded when first needed instead
        }
        self.background.push(Background {
            loading,
            results: rx,
        });
        n
    }

    /// Takes the modules background threads have loaded; with `want`, first waits for
    /// that module if one of them is loading it, until `until` at the latest (the
    /// caller then finds it still loading).
    fn receive_background(&mut self, want: Option<ModuleKey>, until: Instant) {
        use std::sync::mpsc::RecvTimeoutError;
        let mut i = 0;
        while i < self.background.len() {
            let b = &mut self.background[i];
            loop {
                // Waits only while the module wanted is still this thread's to load.
                let got = if want.is_some_and(|k| b.loading.contains(&k)) {
                    let left = until.saturating_duration_since(Instant::now());
                    b.results.recv_timeout(left)
                } else {
                    b.results.try_recv().map_err(|e| match e {
                        std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                        std::sync::mpsc::TryRecvError::Disconnected => {
                            RecvTimeoutError::Disconnected
                        }
                    })
                };
                match got {
                    Ok((key, path, r, refused)) => {
                        b.loading.remove(&key);
                        self.stats.count_load(&r, &path);
                        self.stats.add_refusals(&refused);
                        self.modules.entry(key).or_insert(r);
                    }
                    // A thread that ended (or died) without sending the rest: those are
                    // loaded when first needed.
                    Err(RecvTimeoutError::Disconnected) => {
                        b.loading.clear();
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
            if b.loading.is_empty() {
                self.background.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// One result per address, each with at least one frame: innermost inlined function
    /// first (`inlined: true`), the real function last. With `return_addresses`, every
    /// address is looked up at `addr - 1`.
    #[cfg(test)]
    pub fn symbolize(
        &mut self,
        modules: &ProcessModules,
        addrs: &[u64],
        return_addresses: bool,
    ) -> Vec<Vec<Frame>> {
        let taken: Vec<Taken> = addrs.iter().map(|&a| (a, NOW)).collect();
        self.symbolize_taken(modules, &taken, return_addresses)
    }

    /// [`Self::symbolize`] for addresses of stacks taken in given generations:
    /// each is resolved in the mapping that held it then.
    pub fn symbolize_taken(
        &mut self,
        modules: &ProcessModules,
        addrs: &[Taken],
        return_addresses: bool,
    ) -> Vec<Vec<Frame>> {
        // Every module these need and nobody loads yet is loaded on one background
        // thread, so that no lookup waits for a file without a deadline.
        let probes = addrs.iter().map(|&(a, g)| {
            if return_addresses {
                (a, g)
            } else {
                (a.saturating_add(1), g)
            }
        });
        self.load_taken_in_background(modules, probes);
        addrs
            .iter()
            .map(|&(a, g)| self.symbolize_one(modules, a, g, return_addresses))
            .collect()
    }

    /// For a `bpf_get_stack` user stack as captured: entry 0 is the interrupted instruction
    /// pointer (for a uprobe on `malloc` it is `malloc` itself — looking up `ip - 1` would
    /// name the preceding function), all others are return addresses.
    #[cfg(test)]
    pub fn symbolize_stack(
        &mut self,
        modules: &ProcessModules,
        stack: &[u64],
        first_is_ip: bool,
    ) -> Vec<Vec<Frame>> {
        stack
            .iter()
            .enumerate()
            .map(|(i, &a)| self.symbolize_one(modules, a, NOW, !(i == 0 && first_is_ip)))
            .collect()
    }

    fn symbolize_one(
        &mut self,
        modules: &ProcessModules,
        addr: u64,
        generation: Generation,
        return_address: bool,
    ) -> Vec<Frame> {
        self.stats.addresses += 1;
        let probe = if return_address {
            addr.saturating_sub(1)
        } else {
            addr
        };
        let frames = match mapping(modules, probe, generation) {
            Err(reason) => vec![to_frame(addr, None, FrameInfo::unresolved(reason))],
            Ok(m) => {
                let infos = self.resolve_in(modules, m, probe);
                infos
                    .into_iter()
                    .map(|fi| to_frame(addr, Some(&m.path), fi))
                    .collect()
            }
        };
        for f in &frames {
            self.stats.count(f);
        }
        frames
    }

    fn resolve_in(
        &mut self,
        modules: &ProcessModules,
        m: &MappedModule,
        probe: u64,
    ) -> Vec<FrameInfo> {
        let Some(key) = m.key else {
            return vec![FrameInfo::unresolved(Unresolved::FileUnavailable)];
        };
        let off = m.file_offset(probe);
        if let Some(hit) = self.results.get(&(key, off)) {
            self.stats.cache_hits += 1;
            return hit.clone();
        }
        let infos = match self.module(modules, m, key) {
            Err(e) => vec![FrameInfo::unresolved(e.reason)],
            Ok(elf) => match elf.vaddr_of(off) {
                None => vec![FrameInfo::unresolved(Unresolved::Malformed)],
                Some(vaddr) => elf.resolve(vaddr),
            },
        };
        // Not cached while the module is still loading: a later lookup gets it.
        if infos[0].unresolved != Some(Unresolved::NotLoadedInTime) {
            self.results.insert((key, off), infos.clone());
        }
        infos
    }

    fn module(
        &mut self,
        modules: &ProcessModules,
        m: &MappedModule,
        key: ModuleKey,
    ) -> Result<&ElfModule, LoadError> {
        if !self.modules.contains_key(&key) {
            // Loaded on a background thread, never here: a file that never answers
            // (a FIFO's open, a stalled FUSE read) stops that thread, not the caller.
            self.load_modules_in_background(modules, [m]);
            if !self.background.is_empty() {
                self.receive_background(Some(key), self.wait_end());
            }
        }
        if !self.modules.contains_key(&key) {
            if self.background.iter().any(|b| b.loading.contains(&key)) {
                self.stats.load_waits_timed_out += 1;
                log::debug!("{}: debug info not loaded in time", m.path);
                return Err(LoadError {
                    reason: Unresolved::NotLoadedInTime,
                    msg: "debug info not loaded in time".into(),
                });
            }
            // The loader thread could not be started, or ended without it.
            let (res, refused) = load_module(modules, m, &self.debug_root);
            self.stats.count_load(&res, &m.path);
            self.stats.add_refusals(&refused);
            self.modules.insert(key, res);
        }
        match &self.modules[&key] {
            Ok(elf) => Ok(elf),
            Err(e) => Err(e.clone()),
        }
    }

    /// Symbolizes ELF virtual addresses of one file, as binutils `addr2line -e FILE` takes
    /// them (no process involved); its separate debug file is searched as for a process
    /// whose root is ours. One result per address, as [`Self::symbolize`] returns them.
    #[cfg(test)]
    pub fn symbolize_file(
        &mut self,
        path: &Path,
        vaddrs: &[u64],
    ) -> Result<Vec<Vec<Frame>>, SymbolizeError> {
        let shown = path.display().to_string();
        let (unique, mut infos) = self.symbolize_file_unique(path, vaddrs)?;
        // The frames of an address are moved out at its last occurrence, copied before.
        let at: Vec<usize> = vaddrs
            .iter()
            .map(|v| {
                unique
                    .binary_search(v)
                    .expect("every address is in `unique`")
            })
            .collect();
        let mut uses = vec![0u32; unique.len()];
        for &i in &at {
            uses[i] += 1;
        }
        let mut out = Vec::with_capacity(vaddrs.len());
        for (&v, &i) in vaddrs.iter().zip(&at) {
            uses[i] -= 1;
            let frames: Vec<Frame> = if uses[i] == 0 {
                std::mem::take(&mut infos[i])
                    .into_iter()
                    .map(|fi| to_frame(v, Some(&shown), fi))
                    .collect()
            } else {
                infos[i]
                    .iter()
                    .map(|fi| to_frame(v, Some(&shown), fi.clone()))
                    .collect()
            };
            out.push(frames);
        }
        Ok(out)
    }

    /// [`Self::symbolize_file`] without the copies: the addresses sorted and
    /// deduplicated, and the frames of each (`memtrace symbolize` prints them by
    /// looking each address up, with no [`Frame`] built per frame). The statistics count
    /// every address of `vaddrs`, repeats included, as `symbolize_file` returns them.
    pub(crate) fn symbolize_file_unique(
        &mut self,
        path: &Path,
        vaddrs: &[u64],
    ) -> Result<(Vec<u64>, Vec<Vec<FrameInfo>>), SymbolizeError> {
        let open_err = |err| SymbolizeError::Open {
            path: path.to_owned(),
            err,
        };
        // Without blocking, and only a regular file: a FIFO named here must not hang.
        let file = open_regular(path).map_err(|e| open_err(e.into()))?;
        let (dev, ino) = crate::process::served::identity(&file).map_err(open_err)?;
        let key = ModuleKey::File { dev, ino };
        if !self.modules.contains_key(&key) {
            // A debuglink is searched next to the binary: that needs its real path (no
            // symbolic link is followed next to it).
            let abs = std::fs::canonicalize(path)
                .or_else(|_| std::path::absolute(path))
                .unwrap_or_else(|_| path.to_owned());
            let abs = abs.to_string_lossy();
            let search = DebugSearch::host(&self.debug_root, &abs, Some((dev, ino)));
            let t = std::time::Instant::now();
            let res = ElfModule::for_batch(&file, &search);
            log::debug!("{}: loaded in {:?}", path.display(), t.elapsed());
            self.stats.count_load(&res, &path.display().to_string());
            self.stats.add_refusals(&search.refused());
            self.modules.insert(key, res);
        }
        let elf = match &self.modules[&key] {
            Ok(elf) => elf,
            Err(e) => {
                return Err(SymbolizeError::Module {
                    path: path.to_owned(),
                    msg: e.msg.clone(),
                });
            }
        };
        // Sorted and deduplicated, consecutive lookups tend to stay in one unit.
        let mut unique: Vec<u64> = vaddrs.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let t = std::time::Instant::now();
        let infos = elf.resolve_sorted(&unique);
        log::debug!("{} addresses resolved in {:?}", unique.len(), t.elapsed());
        if unique.len() == vaddrs.len() {
            for frames in &infos {
                self.stats.count_address(frames);
            }
        } else {
            for v in vaddrs {
                let i = unique
                    .binary_search(v)
                    .expect("every address is in `unique`");
                self.stats.count_address(&infos[i]);
            }
        }
        Ok((unique, infos))
    }

    /// Parses every module of `modules` that is not cached yet (on the background
    /// loader, see [`Self::load_in_background`]) and waits for them. Returns how many
    /// were parsed.
    #[cfg(test)]
    pub fn preload(&mut self, modules: &ProcessModules) -> usize {
        let n = self.load_modules_in_background(modules, modules.modules());
        while let Some(&key) = self
            .background
            .first()
            .and_then(|b| b.loading.iter().next())
        {
            self.receive_background(Some(key), self.wait_end());
        }
        n
    }

    /// The GNU build id (lowercase hex) of module `m`, if the symbolizer has
    /// already read its file (never waits for it) and it has one.
    pub fn loaded_build_id(&self, m: &MappedModule) -> Option<String> {
        let elf = self.modules.get(&m.key?)?.as_ref().ok()?;
        let id = elf.build_id.as_ref()?;
        Some(id.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// Parses (or reuses) the module and reports what debug information was found.
    #[cfg(test)]
    pub fn module_summary(&mut self, modules: &ProcessModules, m: &MappedModule) -> ModuleSummary {
        let mut s = ModuleSummary {
            path: m.path.clone(),
            build_id: None,
            debug_file: None,
            supplementary_file: None,
            has_dwarf: false,
            symbols: 0,
            data_bytes: 0,
            error: m.open_error.clone(),
        };
        let Some(key) = m.key else { return s };
        match self.module(modules, m, key) {
            Err(e) => s.error = Some(e.msg),
            Ok(elf) => {
                s.build_id = elf
                    .build_id
                    .as_ref()
                    .map(|b| b.iter().map(|x| format!("{x:02x}")).collect());
                s.debug_file = elf.debug_file.clone();
                s.supplementary_file = elf.sup_file.clone();
                s.has_dwarf = elf.has_dwarf();
                s.symbols = elf.symbol_count();
                s.data_bytes = elf.mapped_bytes();
                s.error = elf.dwarf_note();
            }
        }
        s
    }
}

/// The mapping that held `addr` in `generation` ([`NOW`]: holds it now), or
/// why there is none to resolve it in.
fn mapping(
    modules: &ProcessModules,
    addr: u64,
    generation: Generation,
) -> Result<&MappedModule, Unresolved> {
    if generation == NOW {
        return modules.module_for(addr).ok_or(Unresolved::Unmapped);
    }
    match modules.module_at(addr, generation) {
        Lookup::Module(m) => Ok(m),
        Lookup::Unmapped => Err(Unresolved::Unmapped),
        Lookup::Unseen => Err(Unresolved::ModuleUnseen),
        Lookup::Ambiguous => Err(Unresolved::ModuleAmbiguous),
    }
}

fn load_module(
    modules: &ProcessModules,
    m: &MappedModule,
    debug_root: &Path,
) -> (Result<ElfModule, LoadError>, BTreeMap<&'static str, u64>) {
    match m.key {
        Some(key) => LoadJob::new(modules, m, key).load(debug_root),
        // Only a module that could not be opened has no key.
        None => (
            Err(LoadError {
                reason: Unresolved::FileUnavailable,
                msg: m.open_error.clone().unwrap_or_else(|| "no file".into()),
            }),
            BTreeMap::new(),
        ),
    }
}

fn to_frame(address: u64, module: Option<&str>, fi: FrameInfo) -> Frame {
    Frame {
        address,
        module: module.map(str::to_owned),
        function: fi.function,
        file: fi.file,
        line: fi.line,
        inlined: fi.inlined,
        kind: FrameKind::Native,
        unresolved: fi.unresolved,
    }
}
