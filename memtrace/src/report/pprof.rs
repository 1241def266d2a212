//! The report as a pprof heap profile (`profile.proto`, gzipped), laid out
//! as Go's `runtime/pprof` writes one, so that `go tool pprof`, Pyroscope and
//! Parca read it as a heap profile:
//!
//! - sample types `alloc_objects/count`, `alloc_space/bytes`,
//!   `inuse_objects/count`, `inuse_space/bytes` (the default), period type
//!   `space/bytes`;
//! - one sample per site, its stack leaf first, labelled with its verdict;
//!   the freed sites too (no bytes in use; their allocations count);
//! - one location per address of a stack, with an inlined call as several
//!   lines of that location, innermost first;
//! - one mapping per module, with its build id when the file has one.
//!
//! In sampled mode the figures are the report's estimates, as they are in
//! the JSON, and the period is the mean sampling interval.
use std::{io, io::Write, sync::Arc};

use flate2::{Compression, write::GzEncoder};
// Keyed by strings and pointers, tens of thousands of lookups a profile.
use rustc_hash::FxHashMap as HashMap;

use super::proto::Message;
use super::{Frame, Frames, ModuleInfo, Report, Sampling};
use crate::analyze::Verdict;

/// What a profile is made of: the final report's sites, or the live ones
/// that `--listen` serves.
pub struct Profile<'a> {
    pub samples: Vec<ProfileSample<'a>>,
    pub modules: &'a [ModuleInfo],
    pub sampling: Sampling,
    pub duration_s: f64,
    pub comments: Vec<String>,
}

/// One site: its figures in `SAMPLE_TYPES` order, its stack, its verdict.
pub struct ProfileSample<'a> {
    pub values: [u64; 4],
    pub frames: &'a Frames,
    /// None while tracing (verdicts come at the end).
    pub verdict: Option<Verdict>,
}

impl<'a> Profile<'a> {
    /// The final report's profile: every site it holds.
    pub fn of_report(report: &'a Report) -> Self {
        Profile {
            // Freed sites too: the alloc_* figures cover every allocation.
            samples: report
                .sites
                .iter()
                .chain(&report.freed_sites)
                .map(|s| ProfileSample {
                    values: [
                        s.alloc_calls,
                        s.alloc_bytes,
                        s.outstanding_blocks,
                        s.outstanding_bytes,
                    ],
                    frames: &s.frames,
                    verdict: Some(s.verdict),
                })
                .collect(),
            modules: &report.modules,
            sampling: report.sampling,
            duration_s: report.duration_s,
            comments: comments(report),
        }
    }

    /// Gzipped, as pprof files and endpoints are: at the fastest level, as
    /// Go's runtime/pprof writes them (a scraped endpoint pays it each time;
    /// the default level took a third of a profile's CPU at 10,000 sites
    /// for a file a few percent smaller).
    pub fn gzipped(&self) -> io::Result<Vec<u8>> {
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(&encode(self))?;
        gz.finish()
    }
}

/// Writes `report` as a gzipped pprof profile.
pub fn write_pprof(report: &Report, w: &mut dyn Write) -> io::Result<()> {
    w.write_all(&Profile::of_report(report).gzipped()?)
}

/// The sample types, in Go's order: the last is the default.
const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
];

/// The uncompressed `Profile` message.
fn encode(p: &Profile) -> Vec<u8> {
    let mut t = Tables::new(p.modules);
    let mut profile = Message::new();
    for (ty, unit) in SAMPLE_TYPES {
        profile.message(1, t.value_type(ty, unit));
    }
    let verdict_key = t.string("verdict");
    for site in &p.samples {
        let locations: Vec<u64> = site.frames.groups().iter().map(|g| t.location(g)).collect();
        let mut sample = Message::new();
        sample.packed(1, locations);
        sample.packed(2, site.values);
        if let Some(v) = site.verdict {
            let mut label = Message::new();
            label.int(1, verdict_key);
            label.int(2, t.string(v.as_str()));
            sample.message(3, label);
        }
        profile.message(2, sample);
    }
    profile.int(10, (p.duration_s * 1e9) as i64);
    profile.message(11, t.value_type("space", "bytes"));
    profile.int(
        12,
        match p.sampling {
            Sampling::Bytes { mean_bytes } => mean_bytes as i64,
            _ => 1,
        },
    );
    let comments: Vec<u64> = p.comments.iter().map(|c| t.string(c) as u64).collect();
    profile.packed(13, comments);
    profile.int(14, t.string("inuse_space"));
    t.finish(profile)
}

/// What a reader of the profile should know about where it comes from.
fn comments(report: &Report) -> Vec<String> {
    let mut c = vec![format!(
        "memtrace {}: pid {} ({}), {:.1} s from {}",
        report.memtrace_version,
        report.target.pid,
        report.target.exe.as_deref().unwrap_or("?"),
        report.duration_s,
        report.started_at
    )];
    c.push(match report.sampling {
        Sampling::Bytes { mean_bytes } => format!(
            "sampled: one allocation per {mean_bytes} bytes on average; figures are estimates"
        ),
        _ => "exact: every allocator call recorded".to_string(),
    });
    let t = &report.totals;
    c.push(format!(
        "dropped_events {}, stack_errors {}; only sites with blocks older than {} s are samples",
        t.dropped_events, t.stack_errors, report.min_age_s
    ));
    c
}

/// The profile's string table, functions, locations and mappings, each
/// numbered from 1 in the order first used.
struct Tables<'a> {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<Message>,
    /// By name, then (among the few of one name) by file: looked up without
    /// making a key, once per frame.
    function_ids: HashMap<String, Vec<(Option<String>, u64)>>,
    locations: Vec<Message>,
    location_ids: HashMap<*const [Frame], u64>,
    /// Keeps every located group alive, so that no pointer in
    /// `location_ids` is reused by another.
    located: Vec<Arc<[Frame]>>,
    modules: &'a [ModuleInfo],
    /// Per module (an index in `modules`, or a path with no mapping): its
    /// mapping id and what its frames have.
    mappings: Vec<MappingUse>,
}

#[derive(Default)]
struct MappingUse {
    module: Option<usize>,
    path: String,
    functions: bool,
    files: bool,
    lines: bool,
    inlines: bool,
}

impl<'a> Tables<'a> {
    fn new(modules: &'a [ModuleInfo]) -> Self {
        let mut t = Tables {
            strings: Vec::new(),
            string_ids: HashMap::default(),
            functions: Vec::new(),
            function_ids: HashMap::default(),
            locations: Vec::new(),
            location_ids: HashMap::default(),
            located: Vec::new(),
            modules,
            mappings: Vec::new(),
        };
        t.string("");
        t
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    fn value_type(&mut self, ty: &str, unit: &str) -> Message {
        let mut m = Message::new();
        m.int(1, self.string(ty));
        m.int(2, self.string(unit));
        m
    }

    /// The location of one address's frames (innermost first; the last is
    /// the function they are inlined into).
    fn location(&mut self, group: &Arc<[Frame]>) -> u64 {
        let key = Arc::as_ptr(group);
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        let Some(first) = group.first() else {
            return 0;
        };
        let mut loc = Message::new();
        loc.uint(1, id);
        let mapping = first
            .module
            .as_deref()
            .map(|m| self.mapping(m, first.address));
        loc.uint(2, mapping.unwrap_or(0));
        loc.uint(3, first.address);
        for f in group.iter() {
            let Some(function) = &f.function else {
                continue;
            };
            if let Some(m) = mapping {
                let u = &mut self.mappings[m as usize - 1];
                u.functions = true;
                u.files |= f.file.is_some();
                u.lines |= f.line.is_some();
                u.inlines |= f.inlined;
            }
            let mut line = Message::new();
            line.uint(1, self.function(function, f.file.as_deref()));
            line.int(2, f.line.map_or(0, i64::from));
            loc.message(4, line);
        }
        self.locations.push(loc);
        self.location_ids.insert(key, id);
        self.located.push(group.clone());
        id
    }

    fn function(&mut self, name: &str, file: Option<&str>) -> u64 {
        let known = self.function_ids.get(name).and_then(|files| {
            files
                .iter()
                .find(|(f, _)| f.as_deref() == file)
                .map(|&(_, id)| id)
        });
        if let Some(id) = known {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let mut f = Message::new();
        f.uint(1, id);
        let name = self.string(name);
        f.int(2, name);
        f.int(3, name);
        if let Some(file) = file {
            f.int(4, self.string(file));
        }
        self.functions.push(f);
        self.function_ids
            .entry(self.strings[name as usize].clone())
            .or_default()
            .push((file.map(str::to_string), id));
        id
    }

    /// The mapping id of module `path`, which holds `address`.
    fn mapping(&mut self, path: &str, address: u64) -> u64 {
        let module = self
            .modules
            .iter()
            .position(|m| m.path == path && (m.start..m.limit).contains(&address))
            .or_else(|| self.modules.iter().position(|m| m.path == path));
        let found = self
            .mappings
            .iter()
            .position(|u| u.path == path && u.module == module);
        if let Some(i) = found {
            return i as u64 + 1;
        }
        self.mappings.push(MappingUse {
            module,
            path: path.to_string(),
            ..Default::default()
        });
        self.mappings.len() as u64
    }

    /// The profile with every table appended.
    fn finish(mut self, mut profile: Message) -> Vec<u8> {
        let mappings = std::mem::take(&mut self.mappings);
        for (i, u) in mappings.iter().enumerate() {
            let mut m = Message::new();
            m.uint(1, i as u64 + 1);
            let info = u.module.map(|i| &self.modules[i]);
            if let Some(info) = info {
                m.uint(2, info.start);
                m.uint(3, info.limit);
                m.uint(4, info.file_offset);
            }
            m.int(5, self.string(&u.path));
            if let Some(b) = info.and_then(|i| i.build_id.as_deref()) {
                m.int(6, self.string(b));
            }
            m.uint(7, u.functions.into());
            m.uint(8, u.files.into());
            m.uint(9, u.lines.into());
            m.uint(10, u.inlines.into());
            profile.message(3, m);
        }
        for l in self.locations {
            profile.message(4, l);
        }
        for f in self.functions {
            profile.message(5, f);
        }
        for s in &self.strings {
            profile.string(6, s);
        }
        profile.into_bytes()
    }
}
