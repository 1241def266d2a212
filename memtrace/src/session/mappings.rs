//! Memory mappings in a session: the ranges that existed at attach (from
//! /proc/PID/maps), every traced mmap/munmap/mremap applied to the range
//! map as it drains from the kernel's ring buffer, a history sample every
//! interval, the report's `resources.mappings` at the end.
//!
//! Whose a new mapping is, is told from its creating stack, not guessed: a
//! stack with a frame in an allocator module's code (from its first to its
//! last probed function: glibc's malloc.c, where sysmalloc, munmap_chunk
//! and mremap_chunk live) was mapped by the allocator for the heap, whose
//! blocks the heap sites count already; one whose syscall was made in the
//! dynamic loader's own code is the loader's (libraries, dlopen). A
//! mapping asked for with MAP_STACK is a thread's stack (glibc's
//! pthread_create). These are counted apart, never as mapping sites.
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

mod reconcile;

use anyhow::Result;
use memtrace_common::{
    NO_STACK,
    mappings::{
        MAP_ANONYMOUS, MAP_SHARED, MAP_STACK, MREMAP_DONTUNMAP, MapCounter, MapEvent, MapOp,
    },
};

use super::site_history::{Held, SiteHistory, common};
use super::target::Attached;
use crate::{
    analyze::{
        BlockGrouper, VerdictConfig,
        mappings::{RangeMap, Removed},
    },
    attach::allocator::text_ranges,
    kernel::{collect::monotonic_ns, sampling::Sampling},
    process::maps::{MapEntry, read_maps},
    report::VerdictCounts,
    report::mappings::{
        Apart, Existed, MAX_LISTED_RANGES, MapReconciliation, MappingKind, MappingReport, RangeInfo,
    },
    report::metrics::HeldKind,
    report::resource_site::{ResourceSite, SiteDetail},
};

/// Who a range's bytes are counted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// A mapping site (index into `Mappings::sites`).
    Site(u32),
    /// Mapped before attach, of this kind (`EXISTED_KINDS`).
    Existed(u8),
    /// Found in /proc/PID/maps, its mmap event lost: of this kind.
    Seen(u8),
    Allocator,
    ThreadStack,
    Loader,
}

const EXISTED_KINDS: [&str; 5] = ["anon", "file", "heap", "stack", "special"];

/// A mapping site: (stack, file or anonymous, shared).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SiteKey {
    stack_id: u64,
    file: bool,
    shared: bool,
}

/// What a stack's mmaps are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    User,
    Allocator,
    Loader,
}

/// Mapping tracing's state across the run.
pub(super) struct Mappings {
    ranges: RangeMap<Owner>,
    sites: Vec<SiteKey>,
    site_ids: HashMap<SiteKey, u32>,
    /// mmap calls per site.
    created: Vec<u64>,
    classes: HashMap<u64, Class>,
    /// The allocators' code (a hull per module) and the loader's.
    allocator_code: Vec<(u64, u64)>,
    loader_code: Vec<(u64, u64)>,
    /// Numbers the mappings: those that existed at attach, the traced
    /// mmaps, the ranges seen at reconciliations.
    serial: u64,
    /// The file of each traced file mapping, once read from /proc/PID/maps.
    paths: HashMap<u64, String>,
    existed: Existed,
    /// Ranges found by reconciliations, never seen mapped (`Owner::Seen`).
    seen: Existed,
    corrections: MapReconciliation,
    allocator: Apart,
    thread_stacks: Apart,
    loader: Apart,
    unmapped_unknown: u64,
    /// When /proc/PID/maps was read at attach: events from before were
    /// already in it (launch mode: the loader's), and release nothing that
    /// existed at attach.
    snapshot_ns: u64,
    history: SiteHistory,
}

impl Mappings {
    /// Right after attaching: the target's ranges are those that existed
    /// at attach; the events from then on change them.
    pub(super) fn start(at: &Attached, start_ns: u64, interval: Duration) -> Result<Self> {
        let snapshot_ns = monotonic_ns();
        let maps = read_maps(at.pid)?;
        let allocator_code = at
            .allocators
            .modules
            .iter()
            .filter_map(|a| {
                let r = text_ranges(a, &maps);
                Some((r.first()?.0, r.iter().map(|r| r.1).max()?))
            })
            .collect();
        let loader_code = maps
            .iter()
            .filter(|m| m.perms.exec && m.path.as_deref().is_some_and(is_loader))
            .map(|m| (m.start, m.end))
            .collect();
        let mut m = Mappings {
            ranges: RangeMap::default(),
            sites: Vec::new(),
            site_ids: HashMap::new(),
            created: Vec::new(),
            classes: HashMap::new(),
            allocator_code,
            loader_code,
            serial: 0,
            paths: HashMap::new(),
            existed: Existed::default(),
            seen: Existed::default(),
            corrections: MapReconciliation::default(),
            allocator: Apart::default(),
            thread_stacks: Apart::default(),
            loader: Apart::default(),
            unmapped_unknown: 0,
            snapshot_ns,
            history: SiteHistory::new(start_ns, interval),
        };
        for e in &maps {
            let k = existed_kind(e);
            m.serial += 1;
            m.ranges
                .map(e.start, e.end - e.start, Owner::Existed(k), m.serial, 0);
            let kind = m
                .existed
                .by_kind
                .entry(EXISTED_KINDS[k as usize])
                .or_default();
            kind.mappings += 1;
            kind.bytes += e.end - e.start;
            m.existed.mappings += 1;
            m.existed.bytes += e.end - e.start;
        }
        Ok(m)
    }

    /// One interval (`last`: the end of tracing at that time, always
    /// recorded): applies the events, records the history.
    pub(super) fn sample(&mut self, at: &mut Attached, last: Option<u64>) -> Result<()> {
        let now_ns = last.unwrap_or_else(monotonic_ns);
        let snapshot = self.snapshot_if_lost(at);
        let mut touched = Vec::new();
        for e in at.collector.maps.mappings.events() {
            if snapshot.as_ref().is_some_and(|s| s.precedes(&e)) {
                touched.extend(reconcile::touched(&e));
            }
            self.apply(at, &e);
        }
        if let Some(s) = &snapshot {
            self.reconcile(s, &touched);
        }
        self.read_paths(at.pid);
        let mut g = BlockGrouper::new(now_ns, 0, Sampling::Exact);
        for (site, born, bytes) in self.by_mapping().into_values() {
            g.add(site as u64, born, bytes);
        }
        self.history
            .record(now_ns, last.is_some(), 0..self.sites.len() as u64, g);
        Ok(())
    }

    /// The traced mappings with bytes left: mmap serial → (site, birth,
    /// bytes over its pieces).
    fn by_mapping(&self) -> BTreeMap<u64, (u32, u64, u64)> {
        let mut out: BTreeMap<u64, (u32, u64, u64)> = BTreeMap::new();
        for (s, p) in self.ranges.iter() {
            if let Owner::Site(id) = p.owner {
                out.entry(p.mapping).or_insert((id, p.born_ns, 0)).2 += p.end - s;
            }
        }
        out
    }

    /// The mapping sites' verdicts at the last sample.
    pub(super) fn verdicts(&self, vcfg: &VerdictConfig) -> VerdictCounts {
        self.history.verdicts(vcfg)
    }

    /// The traced mappings with bytes left at the last sample, by kind.
    pub(super) fn held(&self) -> Vec<HeldKind> {
        let mut kinds = [("anon_mapping", 0, 0), ("file_mapping", 0, 0)];
        for (id, b) in self.history.held() {
            let k = &mut kinds[usize::from(self.sites[*id as usize].file)];
            k.1 += b.blocks;
            k.2 += b.bytes;
        }
        kinds
            .into_iter()
            .map(|(kind, n, bytes)| HeldKind {
                resource: "mapping",
                kind: kind.to_string(),
                outstanding: n,
                bytes: Some(bytes),
            })
            .collect()
    }

    /// `, mapped 12.0 MiB` for the live line.
    pub(super) fn live_part(&self) -> String {
        let bytes: u64 = self.history.held().values().map(|b| b.bytes).sum();
        format!(", mapped {}", crate::units::format_bytes(bytes as i64))
    }

    fn apply(&mut self, at: &mut Attached, e: &MapEvent) {
        let removed = match MapOp::try_from(e.op) {
            Ok(MapOp::Map) => {
                self.serial += 1;
                let owner = self.owner_of(at, e);
                self.count_apart(owner, |a| a.created += 1);
                let mut r = self
                    .ranges
                    .map(e.addr, e.len, owner, self.serial, e.time_ns);
                // (MAP_FIXED over nothing known is no unmapping.)
                r.unknown = 0;
                r
            }
            Ok(MapOp::Unmap) => self.ranges.unmap(e.addr, e.len),
            Ok(MapOp::Remap) => {
                let keep_old = e.prot & MREMAP_DONTUNMAP != 0;
                let (r, _) = self.ranges.remap(
                    e.addr,
                    e.len,
                    e.new_addr,
                    e.new_len,
                    keep_old,
                    Owner::Existed(0),
                );
                r
            }
            Err(_) => Removed::default(),
        };
        // Replayed over the ranges read at attach, which showed its effect.
        if e.time_ns < self.snapshot_ns {
            return;
        }
        self.unmapped_unknown += removed.unknown;
        for (owner, bytes) in removed.by_owner {
            self.count_released(owner, bytes);
        }
    }

    /// `bytes` of `owner`'s unmapped: those that existed at attach or were
    /// seen at a reconciliation are counted by kind.
    fn count_released(&mut self, owner: Owner, bytes: u64) {
        let (set, k) = match owner {
            Owner::Existed(k) => (&mut self.existed, k),
            Owner::Seen(k) => (&mut self.seen, k),
            _ => return,
        };
        set.released_bytes += bytes;
        if let Some(kind) = set.by_kind.get_mut(EXISTED_KINDS[k as usize]) {
            kind.released_bytes += bytes;
        }
    }

    fn count_apart(&mut self, owner: Owner, f: impl FnOnce(&mut Apart)) {
        match owner {
            Owner::Allocator => f(&mut self.allocator),
            Owner::ThreadStack => f(&mut self.thread_stacks),
            Owner::Loader => f(&mut self.loader),
            Owner::Site(id) => self.created[id as usize] += 1,
            Owner::Existed(_) | Owner::Seen(_) => {}
        }
    }

    /// Whose a new mapping is (see the module's comment).
    fn owner_of(&mut self, at: &mut Attached, e: &MapEvent) -> Owner {
        if e.flags & MAP_STACK != 0 {
            return Owner::ThreadStack;
        }
        let class = match self.classes.get(&e.stack_id) {
            Some(c) => *c,
            None => {
                let c = self.classify(at, e.stack_id);
                self.classes.insert(e.stack_id, c);
                c
            }
        };
        match class {
            Class::Allocator => return Owner::Allocator,
            Class::Loader => return Owner::Loader,
            Class::User => {}
        }
        let key = SiteKey {
            stack_id: e.stack_id,
            file: e.flags & MAP_ANONYMOUS == 0 && e.fd >= 0,
            shared: e.flags & MAP_SHARED != 0,
        };
        let id = *self.site_ids.entry(key).or_insert_with(|| {
            self.sites.push(key);
            self.created.push(0);
            (self.sites.len() - 1) as u32
        });
        Owner::Site(id)
    }

    fn classify(&self, at: &mut Attached, stack_id: u64) -> Class {
        if stack_id == NO_STACK {
            return Class::User;
        }
        let Ok(frames) = at.collector.stack(stack_id) else {
            return Class::User;
        };
        let inside = |code: &[(u64, u64)], pc: u64| code.iter().any(|&(s, e)| pc >= s && pc < e);
        if frames
            .first()
            .is_some_and(|&pc| inside(&self.loader_code, pc))
        {
            return Class::Loader;
        }
        // Return addresses (every frame but the first) point past their call.
        let mut pcs = frames
            .iter()
            .enumerate()
            .map(|(i, &a)| if i == 0 { a } else { a.wrapping_sub(1) });
        if pcs.any(|pc| inside(&self.allocator_code, pc)) {
            return Class::Allocator;
        }
        Class::User
    }

    /// The file of each traced file mapping not named yet, from the
    /// target's /proc/PID/maps while it runs.
    fn read_paths(&mut self, pid: u32) {
        let wanted: Vec<(u64, u64)> = self
            .ranges
            .iter()
            .filter(|(_, p)| match p.owner {
                Owner::Site(id) => {
                    self.sites[id as usize].file && !self.paths.contains_key(&p.mapping)
                }
                _ => false,
            })
            .map(|(s, p)| (s, p.mapping))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let Ok(maps) = read_maps(pid) else { return };
        for (start, mapping) in wanted {
            if let Some(path) = maps
                .iter()
                .find(|m| m.start <= start && start < m.end)
                .and_then(|m| m.path.clone())
            {
                self.paths.insert(mapping, path);
            }
        }
    }

    /// The report's `resources.mappings` (its sites' frames not filled in).
    pub(super) fn report(
        &self,
        at: &mut Attached,
        end_ns: u64,
        vcfg: &VerdictConfig,
    ) -> Result<MappingReport> {
        let counters = at.collector.maps.mappings.counters()?;
        let sites = self.sites(at, end_ns, vcfg)?;
        let apart = self.apart();
        let mut events: BTreeMap<&'static str, u64> = MapCounter::ALL
            .iter()
            .map(|&c| (c.name(), counters.get(c)))
            .collect();
        events.insert("unmapped_unknown_bytes", self.unmapped_unknown);
        Ok(MappingReport {
            bytes: sites.iter().filter_map(|s| s.bytes).sum(),
            by_kind: self.kinds(&sites),
            existed_at_attach: self.existed.clone(),
            seen_at_reconciliation: self.seen.clone(),
            reconciliation: self.corrections,
            allocator: apart[0],
            thread_stacks: apart[1],
            loader: apart[2],
            events,
            verdicts: VerdictCounts::of_resources(&sites),
            sites,
        })
    }

    /// What the allocator, thread creation and the loader hold at the end.
    fn apart(&self) -> [Apart; 3] {
        let mut apart = [self.allocator, self.thread_stacks, self.loader];
        for (s, p) in self.ranges.iter() {
            let i = match p.owner {
                Owner::Allocator => 0,
                Owner::ThreadStack => 1,
                Owner::Loader => 2,
                _ => continue,
            };
            apart[i].bytes += p.end - s;
        }
        for (i, owner) in [Owner::Allocator, Owner::ThreadStack, Owner::Loader]
            .iter()
            .enumerate()
        {
            let mut seen: Vec<u64> = self
                .ranges
                .iter()
                .filter(|(_, p)| p.owner == *owner)
                .map(|(_, p)| p.mapping)
                .collect();
            seen.sort_unstable();
            seen.dedup();
            apart[i].outstanding = seen.len() as u64;
        }
        apart
    }

    /// The sites with bytes mapped at the end, most bytes first.
    fn sites(
        &self,
        at: &mut Attached,
        end_ns: u64,
        vcfg: &VerdictConfig,
    ) -> Result<Vec<ResourceSite>> {
        let age = |t: u64| end_ns.saturating_sub(t) as f64 / 1e9;
        let mut ranges_of: BTreeMap<u32, Vec<(u64, u64, u64, u64)>> = BTreeMap::new();
        for (s, p) in self.ranges.iter() {
            if let Owner::Site(id) = p.owner {
                ranges_of
                    .entry(id)
                    .or_default()
                    .push((s, p.end, p.mapping, p.born_ns));
            }
        }
        let mut sites = Vec::new();
        for (id, ranges) in ranges_of {
            let key = self.sites[id as usize];
            let mut mappings: Vec<u64> = ranges.iter().map(|r| r.2).collect();
            mappings.sort_unstable();
            mappings.dedup();
            let paths = mappings.iter().filter_map(|m| self.paths.get(m));
            let held = Held {
                kind: if key.file {
                    "file_mapping"
                } else {
                    "anon_mapping"
                }
                .to_string(),
                description: if key.file {
                    common(paths).cloned()
                } else {
                    None
                },
                outstanding: mappings.len() as u64,
                created: self.created[id as usize],
                bytes: Some(ranges.iter().map(|r| r.1 - r.0).sum()),
                oldest_ns: ranges.iter().map(|r| r.3).min(),
                stack_id: key.stack_id,
                detail: SiteDetail::Mapping {
                    shared: key.shared,
                    ranges: ranges
                        .iter()
                        .take(MAX_LISTED_RANGES)
                        .map(|&(s, e, _, born)| RangeInfo {
                            start: format!("{s:#x}"),
                            end: format!("{e:#x}"),
                            bytes: e - s,
                            age_s: age(born),
                        })
                        .collect(),
                },
            };
            sites.push(self.history.site(at, id as u64, held, end_ns, vcfg)?);
        }
        sites.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.kind.cmp(&b.kind)));
        Ok(sites)
    }

    fn kinds(&self, sites: &[ResourceSite]) -> Vec<MappingKind> {
        ["anon_mapping", "file_mapping"]
            .into_iter()
            .map(|kind| MappingKind {
                kind,
                outstanding: sites
                    .iter()
                    .filter(|s| s.kind == kind)
                    .map(|s| s.outstanding)
                    .sum(),
                bytes: sites
                    .iter()
                    .filter(|s| s.kind == kind)
                    .filter_map(|s| s.bytes)
                    .sum(),
                created: self
                    .sites
                    .iter()
                    .zip(&self.created)
                    .filter(|(k, _)| k.file == (kind == "file_mapping"))
                    .map(|(_, n)| n)
                    .sum(),
            })
            .collect()
    }
}

/// The dynamic loader's file (`ld-linux-x86-64.so.2`, `ld-musl-x86_64.so.1`).
fn is_loader(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("ld-linux") || name.starts_with("ld-musl") || name.starts_with("ld.so")
}

/// The kind (index into `EXISTED_KINDS`) of a range that existed at attach.
fn existed_kind(e: &MapEntry) -> u8 {
    match e.path.as_deref() {
        None => 0,
        Some(p) if p.starts_with('/') => 1,
        Some("[heap]") => 2,
        Some(p) if p.starts_with("[stack") => 3,
        Some(p) if p.starts_with("[anon") => 0,
        Some(_) => 4,
    }
}
