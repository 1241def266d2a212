//! `memtrace diff OLD.json NEW.json`: two reports (snapshots) compared site by
//! site, like tracemalloc's `Snapshot.compare_to`.
//!
//! Sites are matched by their *stack key*: the sequence, innermost first, of
//! (module file name, function, source file, line) of their frames. Addresses
//! are not part of it (they move between runs with ASLR), nor the module's
//! directory (a container may show it under another root). A frame that was
//! not symbolized is keyed by its module alone. Sites of one report with the
//! same key (two call instructions on one line, say) are added up. A site whose
//! stack was not captured has the key `[stack not captured]`.
//!
//! Reports are read as plain JSON: any `memtrace-report/1` document, from
//! this version or an older one (fields it lacks, such as `verdict`, are left out).
use crate::escape::{Escaped, escaped};
use std::{collections::HashMap, fmt::Write as _, path::Path};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use crate::{
    report::SCHEMA,
    units::{format_bytes, format_count, format_duration, format_rate},
};

pub const DIFF_SCHEMA: &str = "memtrace-diff/1";

/// One frame of a stack key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameKey {
    pub module: Option<String>,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u64>,
}

fn basename(p: &str) -> String {
    p.rsplit('/').next().unwrap_or(p).to_string()
}

fn str_field(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

impl FrameKey {
    pub fn of(frame: &Value) -> FrameKey {
        let module = str_field(frame, "module").map(|m| basename(&m));
        let function = str_field(frame, "function");
        if function.is_none() {
            return FrameKey {
                module,
                function: None,
                file: None,
                line: None,
            };
        }
        FrameKey {
            module,
            function,
            file: str_field(frame, "file"),
            line: frame.get("line").and_then(Value::as_u64),
        }
    }
}

/// The stack key of a site (see the module documentation); empty for a site
/// whose stack was not captured.
pub fn site_key(site: &Value) -> Vec<FrameKey> {
    if site.get("stack_captured").and_then(Value::as_bool) == Some(false) {
        return Vec::new();
    }
    site.get("frames")
        .and_then(Value::as_array)
        .map(|fs| fs.iter().map(FrameKey::of).collect())
        .unwrap_or_default()
}

/// One site of one report (sites with the same key added up).
#[derive(Clone, Debug, PartialEq)]
pub struct SnapSite {
    pub bytes: i64,
    pub blocks: i64,
    pub verdict: Option<String>,
    pub growth_bytes_per_s: Option<f64>,
    /// The frames of the first site with this key, as in the report.
    pub frames: Value,
}

/// What a report says about itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SnapInfo {
    pub path: String,
    pub pid: Option<u64>,
    pub exe: Option<String>,
    pub duration_s: Option<f64>,
    pub ended_at: Option<String>,
    pub outstanding_bytes: i64,
    pub outstanding_blocks: i64,
    pub sites: usize,
    /// Sites in its `freed_sites` (none in a report older than that list).
    pub freed_sites: usize,
    /// Freed sites its JSON left out (`freed_sites_left_out.sites`): a site
    /// missing from the report may be one of them.
    pub freed_sites_left_out: u64,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub info: SnapInfo,
    pub sites: HashMap<Vec<FrameKey>, SnapSite>,
    /// The report's `freed_sites`: sites that allocated while traced but hold
    /// no block (or only blocks younger than `--min-age`, counted here).
    pub freed: HashMap<Vec<FrameKey>, SnapSite>,
    /// The fd sites (`resources.fds.sites`), by kind and stack key; their
    /// `bytes` is 0, `blocks` the open fds.
    pub fd_sites: HashMap<(String, Vec<FrameKey>), SnapSite>,
    /// The mapping sites (`resources.mappings.sites`), by kind and stack
    /// key: `bytes` mapped, `blocks` the mappings.
    pub mapping_sites: HashMap<(String, Vec<FrameKey>), SnapSite>,
}

/// The resource sites of report `v` in the lists at `lists` (none in a
/// report without them), by kind and stack key: `blocks` the items held
/// (fds, threads, mappings), `bytes` the bytes mapped (0 for fds and
/// threads, whose `bytes` is null). `noun` names them in messages.
fn resource_sites(
    v: &Value,
    path: &str,
    lists: &[&str],
    noun: &str,
) -> Result<HashMap<(String, Vec<FrameKey>), SnapSite>> {
    let list = lists.iter().flat_map(|p| {
        v.pointer(p)
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    });
    let mut sites: HashMap<(String, Vec<FrameKey>), SnapSite> = HashMap::new();
    for (i, s) in list.enumerate() {
        let what = format!("{noun} site {}", i + 1);
        let n = count(s, "outstanding", path, &what)?;
        let bytes = count(s, "bytes", path, &what)?;
        let kind = str_field(s, "kind").unwrap_or_default();
        let e = sites
            .entry((kind, site_key(s)))
            .or_insert_with(|| SnapSite {
                bytes: 0,
                blocks: 0,
                verdict: str_field(s, "verdict"),
                growth_bytes_per_s: s.get("growth_per_s").and_then(Value::as_f64),
                frames: s.get("frames").cloned().unwrap_or(Value::Array(vec![])),
            });
        e.blocks = e
            .blocks
            .checked_add(n)
            .with_context(|| format!("{noun} sites' outstanding overflow"))?;
        e.bytes = e
            .bytes
            .checked_add(bytes)
            .with_context(|| format!("{noun} sites' bytes overflow"))?;
    }
    Ok(sites)
}

/// The sites of `list` (`field` of report `path`) by stack key, those with
/// one key added up.
fn sites_by_key(
    list: &[Value],
    path: &str,
    field: &str,
) -> Result<HashMap<Vec<FrameKey>, SnapSite>> {
    let mut sites: HashMap<Vec<FrameKey>, SnapSite> = HashMap::new();
    for (i, s) in list.iter().enumerate() {
        let what = format!("{field} {}", i + 1);
        let bytes = count(s, "outstanding_bytes", path, &what)?;
        let blocks = count(s, "outstanding_blocks", path, &what)?;
        let e = sites.entry(site_key(s)).or_insert_with(|| SnapSite {
            bytes: 0,
            blocks: 0,
            verdict: str_field(s, "verdict"),
            growth_bytes_per_s: s.get("growth_bytes_per_s").and_then(Value::as_f64),
            frames: s.get("frames").cloned().unwrap_or(Value::Array(vec![])),
        });
        // Sites with one key add up; a sum past i64 is no real report.
        e.bytes = e
            .bytes
            .checked_add(bytes)
            .context("outstanding bytes overflow")?;
        e.blocks = e
            .blocks
            .checked_add(blocks)
            .context("outstanding blocks overflow")?;
    }
    Ok(sites)
}

/// Largest report `memtrace diff` reads. A report of ten thousand sites is
/// tens of MB; parsing takes about ten times the file's size in memory, so a
/// bound keeps a wrong argument (a device, a huge file) from exhausting it.
pub const MAX_REPORT_BYTES: u64 = 512 << 20;

/// Count `k` of `v` (a byte or block count, 0 when absent): refused unless it
/// is an integer from 0 to i64::MAX, which is all memtrace writes.
fn count(v: &Value, k: &str, path: &str, what: &str) -> Result<i64> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(0),
        Some(n) => match n.as_u64() {
            Some(c) if c <= i64::MAX as u64 => Ok(c as i64),
            _ => bail!("{path}: {what} `{k}` is {n}: not a count memtrace writes"),
        },
    }
}

impl Snapshot {
    /// A snapshot of a parsed report; `path` names it in messages.
    pub fn from_json(path: &str, v: &Value) -> Result<Snapshot> {
        match v.get("schema").and_then(Value::as_str) {
            Some(SCHEMA) => {}
            Some(other) => bail!(
                "{path} is a `{other}` document, not a memtrace report ({SCHEMA}): \
                 give two reports written with --format json"
            ),
            None => bail!(
                "{path} is not a memtrace report (no `schema`): give two reports written \
                 with --format json"
            ),
        }
        let Some(list) = v.get("sites").and_then(Value::as_array) else {
            bail!("{path} is not a complete memtrace report: it has no `sites` list");
        };
        let sites = sites_by_key(list, path, "site")?;
        let freed_list = match v.get("freed_sites") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(l)) => &l[..],
            Some(_) => bail!("{path}: `freed_sites` is not a list"),
        };
        let freed = sites_by_key(freed_list, path, "freed site")?;
        let left_out = v
            .get("freed_sites_left_out")
            .cloned()
            .unwrap_or(Value::Null);
        let target = v.get("target").cloned().unwrap_or(Value::Null);
        let totals = v.get("totals").cloned().unwrap_or(Value::Null);
        // Thread sites (kind "thread") are compared with the fd sites.
        let fd_lists = ["/resources/fds/sites", "/resources/threads/sites"];
        let fd_sites = resource_sites(v, path, &fd_lists, "fd")?;
        let mapping_sites = resource_sites(v, path, &["/resources/mappings/sites"], "mapping")?;
        Ok(Snapshot {
            info: SnapInfo {
                path: path.to_string(),
                pid: target.get("pid").and_then(Value::as_u64),
                exe: str_field(&target, "exe"),
                duration_s: v.get("duration_s").and_then(Value::as_f64),
                ended_at: str_field(v, "ended_at"),
                outstanding_bytes: count(&totals, "outstanding_bytes", path, "totals")?,
                outstanding_blocks: count(&totals, "outstanding_blocks", path, "totals")?,
                sites: list.len(),
                freed_sites: freed_list.len(),
                freed_sites_left_out: count(&left_out, "sites", path, "freed_sites_left_out")?
                    as u64,
            },
            sites,
            freed,
            fd_sites,
            mapping_sites,
        })
    }

    /// Reads a report file: a regular file of at most [`MAX_REPORT_BYTES`].
    pub fn load(path: &Path) -> Result<Snapshot> {
        let name = path.display().to_string();
        let text = read_bounded(path).with_context(|| format!("cannot read the report {name}"))?;
        let v: Value = serde_json::from_str(&text).with_context(|| {
            format!("{name} is not a JSON report (write reports with --format json)")
        })?;
        Snapshot::from_json(&name, &v)
    }
}

/// The text of `path` if it is a regular file no larger than
/// [`MAX_REPORT_BYTES`]: opened without blocking (a FIFO), and read no further
/// than the bound (a file that grows while read).
fn read_bounded(path: &Path) -> Result<String> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let md = f.metadata()?;
    if !md.is_file() {
        bail!("not a regular file");
    }
    if md.len() > MAX_REPORT_BYTES {
        bail!(
            "{} is larger than memtrace diff reads ({}): not a memtrace report?",
            crate::units::format_bytes(md.len() as i64),
            crate::units::format_bytes(MAX_REPORT_BYTES as i64)
        );
    }
    let mut text = String::new();
    f.take(MAX_REPORT_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_REPORT_BYTES {
        bail!(
            "it grew past {} while being read",
            crate::units::format_bytes(MAX_REPORT_BYTES as i64)
        );
    }
    Ok(text)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Only in NEW.
    New,
    Grew,
    Unchanged,
    Shrank,
    /// In OLD's sites and in NEW's freed sites: its blocks were freed (those
    /// left, if any, are younger than NEW's `--min-age`).
    Freed,
    /// Only in OLD: NEW never saw it allocate.
    Vanished,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::New => "NEW ",
            Status::Vanished => "VANISHED ",
            Status::Freed => "FREED ",
            _ => "",
        }
    }
}

/// One stack key in both reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    pub status: Status,
    pub size_diff: i64,
    pub count_diff: i64,
    pub old_bytes: i64,
    pub old_blocks: i64,
    pub new_bytes: i64,
    pub new_blocks: i64,
    /// The verdict in NEW (or in OLD for a vanished site), if the report has one.
    /// (A freed site's is NEW's, for its allocations while NEW traced.)
    pub verdict: Option<String>,
    pub growth_bytes_per_s: Option<f64>,
    pub frames: Value,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DiffTotals {
    pub size_diff: i64,
    pub count_diff: i64,
    pub new: usize,
    pub grew: usize,
    pub unchanged: usize,
    pub shrank: usize,
    pub freed: usize,
    pub vanished: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Diff {
    pub schema: &'static str,
    pub old: SnapInfo,
    pub new: SnapInfo,
    pub totals: DiffTotals,
    /// Every stack key, by growth in bytes (largest first), then in blocks.
    pub sites: Vec<Entry>,
    /// Every fd site (kind and stack key) of either report, by growth in
    /// open fds (`count_diff`, `old_blocks`/`new_blocks` are fds; the byte
    /// fields are 0); thread sites too, with `kind` "thread" (in threads
    /// alive or exited unjoined).
    pub fd_sites: Vec<FdEntry>,
    /// Every mapping site (kind and stack key) of either report, by growth
    /// in bytes mapped (`old_blocks`/`new_blocks` are mappings).
    pub mapping_sites: Vec<FdEntry>,
}

/// One fd site (kind and stack key) in both reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdEntry {
    pub kind: String,
    #[serde(flatten)]
    pub entry: Entry,
}

/// Compares two snapshots.
pub fn compare(old: &Snapshot, new: &Snapshot) -> Diff {
    let keyed = entries(&old.sites, &new.sites, &old.freed, &new.freed);
    let no_freed = HashMap::new();
    let fd_sites = entries(&old.fd_sites, &new.fd_sites, &no_freed, &no_freed)
        .into_iter()
        .map(|((kind, _), entry)| FdEntry { kind, entry })
        .collect();
    let mapping_sites = entries(&old.mapping_sites, &new.mapping_sites, &no_freed, &no_freed)
        .into_iter()
        .map(|((kind, _), entry)| FdEntry { kind, entry })
        .collect();
    let mut totals = DiffTotals {
        size_diff: new
            .info
            .outstanding_bytes
            .saturating_sub(old.info.outstanding_bytes),
        count_diff: new
            .info
            .outstanding_blocks
            .saturating_sub(old.info.outstanding_blocks),
        ..Default::default()
    };
    for (_, e) in &keyed {
        *match e.status {
            Status::New => &mut totals.new,
            Status::Grew => &mut totals.grew,
            Status::Unchanged => &mut totals.unchanged,
            Status::Shrank => &mut totals.shrank,
            Status::Freed => &mut totals.freed,
            Status::Vanished => &mut totals.vanished,
        } += 1;
    }
    Diff {
        schema: DIFF_SCHEMA,
        old: old.info.clone(),
        new: new.info.clone(),
        totals,
        sites: keyed.into_iter().map(|(_, e)| e).collect(),
        fd_sites,
        mapping_sites,
    }
}

/// Every key of either map, by growth in bytes (largest first), then in
/// blocks. A key in `old_freed` (OLD saw its site free all it allocated)
/// held nothing then; a key of `old` in `new_freed` is freed, not vanished.
fn entries<K: Clone + Ord + std::hash::Hash>(
    old: &HashMap<K, SnapSite>,
    new: &HashMap<K, SnapSite>,
    old_freed: &HashMap<K, SnapSite>,
    new_freed: &HashMap<K, SnapSite>,
) -> Vec<(K, Entry)> {
    let mut keyed: Vec<(K, Entry)> = Vec::new();
    for (k, n) in new {
        let o = old.get(k).or_else(|| old_freed.get(k));
        let (ob, oc) = o.map_or((0, 0), |o| (o.bytes, o.blocks));
        let (sd, cd) = (n.bytes.saturating_sub(ob), n.blocks.saturating_sub(oc));
        let status = match o {
            None => Status::New,
            Some(_) if (sd, cd) > (0, 0) => Status::Grew,
            Some(_) if (sd, cd) < (0, 0) => Status::Shrank,
            Some(_) => Status::Unchanged,
        };
        keyed.push((k.clone(), entry(status, (ob, oc), n, n)));
    }
    for (k, o) in old {
        if new.contains_key(k) {
            continue;
        }
        let e = match new_freed.get(k) {
            Some(f) => entry(Status::Freed, (o.bytes, o.blocks), f, o),
            None => {
                let gone = SnapSite {
                    bytes: 0,
                    blocks: 0,
                    ..o.clone()
                };
                entry(Status::Vanished, (o.bytes, o.blocks), &gone, o)
            }
        };
        keyed.push((k.clone(), e));
    }
    keyed.sort_by(|(ka, a), (kb, b)| {
        b.size_diff
            .cmp(&a.size_diff)
            .then(b.count_diff.cmp(&a.count_diff))
            .then(b.new_bytes.cmp(&a.new_bytes))
            .then(ka.cmp(kb))
    });
    keyed
}

/// The entry of a site that held `old` (bytes, blocks) and holds what `now`
/// says, with `now`'s verdict and `shown`'s frames.
fn entry(status: Status, old: (i64, i64), now: &SnapSite, shown: &SnapSite) -> Entry {
    Entry {
        status,
        size_diff: now.bytes.saturating_sub(old.0),
        count_diff: now.blocks.saturating_sub(old.1),
        old_bytes: old.0,
        old_blocks: old.1,
        new_bytes: now.bytes,
        new_blocks: now.blocks,
        verdict: now.verdict.clone(),
        growth_bytes_per_s: now.growth_bytes_per_s,
        frames: shown.frames.clone(),
    }
}

fn signed_bytes(b: i64) -> String {
    if b > 0 {
        format!("+{}", format_bytes(b))
    } else {
        format_bytes(b)
    }
}

fn signed_count(c: i64) -> String {
    let s = format_count(c.unsigned_abs());
    match c.signum() {
        1 => format!("+{s}"),
        -1 => format!("-{s}"),
        _ => s,
    }
}

fn held(bytes: i64, blocks: i64) -> String {
    if blocks == 0 && bytes == 0 {
        "0 B".into()
    } else {
        format!(
            "{} in {} block{}",
            format_bytes(bytes),
            signed_count(blocks).trim_start_matches('+'),
            if blocks == 1 { "" } else { "s" }
        )
    }
}

/// A frame without its address (addresses differ between runs).
fn frame_line(f: &Value) -> String {
    // A report holds the target's names: escaped for the terminal.
    let func = str_field(f, "function").unwrap_or_else(|| "??".into());
    let mut s = escaped(&func);
    match (str_field(f, "file"), f.get("line").and_then(Value::as_u64)) {
        (Some(file), Some(line)) => {
            let _ = write!(s, " at {}:{line}", Escaped(&file));
        }
        (Some(file), None) => {
            let _ = write!(s, " at {}", Escaped(&file));
        }
        _ => {
            if let Some(m) = str_field(f, "module") {
                let _ = write!(s, " in {}", Escaped(&m));
            }
        }
    }
    if f.get("inlined").and_then(Value::as_bool) == Some(true) {
        s.push_str(" (inlined)");
    }
    s
}

fn info_line(label: &str, i: &SnapInfo) -> String {
    let mut s = format!("{label}: {}", Escaped(&i.path));
    let mut about = Vec::new();
    if let Some(pid) = i.pid {
        about.push(format!(
            "pid {pid}{}",
            i.exe
                .as_deref()
                .map(|e| format!(" ({})", Escaped(e)))
                .unwrap_or_default()
        ));
    }
    if let Some(d) = i.duration_s {
        about.push(format!(
            "traced {}",
            format_duration(
                std::time::Duration::try_from_secs_f64(d.max(0.0))
                    .unwrap_or(std::time::Duration::MAX)
            )
        ));
    }
    if let Some(e) = &i.ended_at {
        about.push(format!("ended {}", Escaped(e)));
    }
    if !about.is_empty() {
        let _ = write!(s, " ({})", about.join(", "));
    }
    let _ = write!(
        s,
        ": {} outstanding, {} site{}",
        held(i.outstanding_bytes, i.outstanding_blocks),
        i.sites,
        if i.sites == 1 { "" } else { "s" }
    );
    s
}

fn entry_text(o: &mut String, rank: usize, e: &Entry) {
    let mut verdict = String::new();
    if let Some(v) = &e.verdict {
        verdict = format!(" [{}", Escaped(v));
        if let Some(g) = e.growth_bytes_per_s
            && (v == "leak" || v == "growing")
        {
            let r = format_rate(g, std::time::Duration::from_secs(1));
            let _ = write!(verdict, ", {}{r}", if g >= 0.0 { "+" } else { "" });
        }
        verdict.push(']');
    }
    let _ = writeln!(
        o,
        "\n#{rank} {}{} ({} blocks): {} -> {}{verdict}",
        e.status.label(),
        signed_bytes(e.size_diff),
        signed_count(e.count_diff),
        held(e.old_bytes, e.old_blocks),
        held(e.new_bytes, e.new_blocks),
    );
    match e.frames.as_array() {
        Some(fs) if !fs.is_empty() => {
            for f in fs {
                let _ = writeln!(o, "    {}", frame_line(f));
            }
        }
        _ => {
            let _ = writeln!(o, "    [stack not captured]");
        }
    }
}

impl Diff {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a diff always serializes");
        s.push('\n');
        s
    }

    pub fn to_text(&self, top: usize) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "memtrace diff: {} -> {}", self.old.path, self.new.path);
        let _ = writeln!(o, "{}", info_line("old", &self.old));
        let _ = writeln!(o, "{}", info_line("new", &self.new));
        let t = &self.totals;
        let _ = writeln!(
            o,
            "total outstanding: {} ({} blocks); sites: {} grew, {} new, {} shrank, {} freed, \
             {} vanished, {} unchanged",
            signed_bytes(t.size_diff),
            signed_count(t.count_diff),
            t.grew,
            t.new,
            t.shrank,
            t.freed,
            t.vanished,
            t.unchanged
        );
        if t.vanished > 0 && self.new.freed_sites_left_out > 0 {
            let _ = writeln!(
                o,
                "(the new report left {} freed sites out of its JSON: a vanished site may be one \
                 of them)",
                format_count(self.new.freed_sites_left_out)
            );
        }
        let up: Vec<&Entry> = self
            .sites
            .iter()
            .filter(|e| matches!(e.status, Status::New | Status::Grew))
            .collect();
        let down: Vec<&Entry> = self
            .sites
            .iter()
            .rev()
            .filter(|e| matches!(e.status, Status::Shrank | Status::Freed | Status::Vanished))
            .collect();
        if up.is_empty() {
            let _ = writeln!(o, "\nno site grew");
        } else {
            let _ = writeln!(
                o,
                "\ntop {} of {} sites that grew or are new, by growth:",
                up.len().min(top),
                up.len()
            );
            for (i, e) in up.iter().take(top).enumerate() {
                entry_text(&mut o, i + 1, e);
            }
        }
        if !down.is_empty() {
            let _ = writeln!(
                o,
                "\ntop {} of {} sites that shrank, were freed or vanished:",
                down.len().min(top),
                down.len()
            );
            for (i, e) in down.iter().take(top).enumerate() {
                entry_text(&mut o, i + 1, e);
            }
        }
        let hidden = up.len().saturating_sub(top) + down.len().saturating_sub(top);
        if hidden > 0 {
            let _ = writeln!(o, "\n... and {hidden} more sites (all in --format json)");
        }
        let (threads, fds): (Vec<&FdEntry>, Vec<&FdEntry>) =
            self.fd_sites.iter().partition(|e| e.kind == "thread");
        resource_text(&mut o, top, fds, ResourceNoun::Fd);
        resource_text(&mut o, top, threads, ResourceNoun::Thread);
        resource_text(
            &mut o,
            top,
            self.mapping_sites.iter().collect(),
            ResourceNoun::Mapping,
        );
        o
    }
}

/// Which resource a part of the diff's text is about.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ResourceNoun {
    Fd,
    Thread,
    Mapping,
}

/// The resource sites of `sites` (of one resource) that grew or are new.
fn resource_text(o: &mut String, top: usize, sites: Vec<&FdEntry>, noun: ResourceNoun) {
    let up: Vec<&FdEntry> = sites
        .into_iter()
        .filter(|e| matches!(e.entry.status, Status::New | Status::Grew))
        .collect();
    if up.is_empty() {
        return;
    }
    let (name, by) = match noun {
        ResourceNoun::Fd => ("fd", "open fds"),
        ResourceNoun::Thread => ("thread", "threads held"),
        ResourceNoun::Mapping => ("mapping", "bytes mapped"),
    };
    let _ = writeln!(
        o,
        "\ntop {} of {} {name} sites that grew or are new, by {by}:",
        up.len().min(top),
        up.len()
    );
    for (i, e) in up.iter().take(top).enumerate() {
        let n = &e.entry;
        let verdict = n
            .verdict
            .as_deref()
            .map(|v| format!(" [{}]", Escaped(v)))
            .unwrap_or_default();
        let (label, kind) = (n.status.label(), Escaped(&e.kind));
        let head = match noun {
            ResourceNoun::Fd => format!(
                "{label}{} {kind} fds: {} -> {}",
                signed_count(n.count_diff),
                n.old_blocks,
                n.new_blocks
            ),
            ResourceNoun::Thread => format!(
                "{label}{} threads: {} -> {}",
                signed_count(n.count_diff),
                n.old_blocks,
                n.new_blocks
            ),
            ResourceNoun::Mapping => format!(
                "{label}+{} {kind}: {} -> {} ({} -> {} mappings)",
                crate::units::format_bytes(n.size_diff),
                crate::units::format_bytes(n.old_bytes),
                crate::units::format_bytes(n.new_bytes),
                n.old_blocks,
                n.new_blocks,
            ),
        };
        let _ = writeln!(o, "\n#{} {head}{verdict}", i + 1);
        match n.frames.as_array() {
            Some(fs) if !fs.is_empty() => {
                for f in fs {
                    let _ = writeln!(o, "    {}", frame_line(f));
                }
            }
            _ => {
                let _ = writeln!(o, "    [stack not captured]");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frame(addr: &str, module: &str, function: Option<&str>, line: u64) -> Value {
        json!({"address": addr, "module": module, "function": function,
               "file": function.map(|_| "/src/app.c"), "line": function.map(|_| line),
               "inlined": false})
    }

    fn site(bytes: i64, blocks: i64, verdict: &str, frames: Vec<Value>) -> Value {
        json!({"outstanding_bytes": bytes, "outstanding_blocks": blocks, "verdict": verdict,
               "growth_bytes_per_s": 10.0, "stack_captured": true, "frames": frames})
    }

    fn report(pid: u64, sites: Vec<Value>) -> Value {
        let bytes: i64 = sites
            .iter()
            .map(|s| s["outstanding_bytes"].as_i64().unwrap())
            .sum();
        let blocks: i64 = sites
            .iter()
            .map(|s| s["outstanding_blocks"].as_i64().unwrap())
            .sum();
        json!({"schema": "memtrace-report/1", "target": {"pid": pid, "exe": "/usr/bin/app"},
               "duration_s": 2.0, "ended_at": "2026-12-01T08:00:05Z",
               "totals": {"outstanding_bytes": bytes, "outstanding_blocks": blocks},
               "sites": sites})
    }

    fn with_fds(mut r: Value, sites: Vec<(&str, i64, &str)>) -> Value {
        let sites: Vec<Value> = sites
            .into_iter()
            .map(|(kind, n, function)| {
                json!({"kind": kind, "outstanding": n, "verdict": "leak", "growth_per_s": 2.0,
                       "stack_captured": true,
                       "frames": [frame("0x10", "/lib/libc.so.6", Some("__socket"), 1),
                                  frame("0x20", "/usr/bin/app", Some(function), 7)]})
            })
            .collect();
        r["resources"] = json!({"fds": {"sites": sites}});
        r
    }

    fn with_mappings(mut r: Value, sites: Vec<(i64, i64, &str)>) -> Value {
        let sites: Vec<Value> = sites
            .into_iter()
            .map(|(n, bytes, function)| {
                json!({"kind": "anon_mapping", "outstanding": n, "bytes": bytes,
                       "verdict": "leak", "growth_per_s": 2.0, "stack_captured": true,
                       "frames": [frame("0x10", "/lib/libc.so.6", Some("__mmap64"), 1),
                                  frame("0x20", "/usr/bin/app", Some(function), 7)]})
            })
            .collect();
        r["resources"] = json!({"fds": {"sites": []}, "mappings": {"sites": sites}});
        r
    }

    #[test]
    fn mapping_sites_are_compared_by_bytes() {
        let old = with_mappings(report(1, vec![]), vec![(2, 8192, "grow_cache")]);
        let new = with_mappings(
            report(2, vec![]),
            vec![(5, 20480, "grow_cache"), (1, 4096, "map_once")],
        );
        let d = compare(
            &Snapshot::from_json("old", &old).unwrap(),
            &Snapshot::from_json("new", &new).unwrap(),
        );
        let got: Vec<(Status, i64, i64)> = d
            .mapping_sites
            .iter()
            .map(|e| (e.entry.status, e.entry.size_diff, e.entry.count_diff))
            .collect();
        assert_eq!(got, vec![(Status::Grew, 12288, 3), (Status::New, 4096, 1)]);
        let text = d.to_text(10);
        assert!(
            text.contains("#1 +12.0 KiB anon_mapping: 8.0 KiB -> 20.0 KiB (2 -> 5 mappings) [leak]\n    __mmap64"),
            "{text}"
        );
        // A report without mappings has none.
        let plain = Snapshot::from_json("plain", &report(3, vec![])).unwrap();
        assert!(plain.mapping_sites.is_empty());
    }

    #[test]
    fn fd_sites_are_compared_by_kind_and_stack() {
        let old = with_fds(
            report(1, vec![]),
            vec![("socket", 3, "connect_db"), ("file", 2, "open_log")],
        );
        let new = with_fds(
            report(2, vec![]),
            vec![("socket", 10, "connect_db"), ("pipe", 1, "spawn")],
        );
        let d = compare(
            &Snapshot::from_json("old", &old).unwrap(),
            &Snapshot::from_json("new", &new).unwrap(),
        );
        let got: Vec<(&str, Status, i64)> = d
            .fd_sites
            .iter()
            .map(|e| (e.kind.as_str(), e.entry.status, e.entry.count_diff))
            .collect();
        assert_eq!(
            got,
            [
                ("socket", Status::Grew, 7),
                ("pipe", Status::New, 1),
                ("file", Status::Vanished, -2)
            ]
        );
        let text = d.to_text(10);
        assert!(
            text.contains("#1 +7 socket fds: 3 -> 10 [leak]\n    __socket at /src/app.c:1\n"),
            "{text}"
        );
        assert!(d.to_json().contains("\"fd_sites\""));
        // A report without resources (older, or --no-resources) has none.
        let plain = Snapshot::from_json("plain", &report(3, vec![])).unwrap();
        assert!(plain.fd_sites.is_empty());
    }

    #[test]
    fn thread_sites_are_compared_with_the_fd_sites() {
        let with_threads = |pid, n| {
            let mut r = with_fds(report(pid, vec![]), vec![("socket", 1, "connect_db")]);
            let t = with_fds(json!({}), vec![("thread", n, "start_worker")]);
            r["resources"]["threads"] = t["resources"]["fds"].clone();
            r
        };
        let d = compare(
            &Snapshot::from_json("old", &with_threads(1, 2)).unwrap(),
            &Snapshot::from_json("new", &with_threads(2, 12)).unwrap(),
        );
        let got: Vec<(&str, Status, i64)> = d
            .fd_sites
            .iter()
            .map(|e| (e.kind.as_str(), e.entry.status, e.entry.count_diff))
            .collect();
        assert_eq!(
            got,
            [
                ("thread", Status::Grew, 10),
                ("socket", Status::Unchanged, 0)
            ]
        );
        let text = d.to_text(10);
        assert!(text.contains("#1 +10 threads: 2 -> 12 [leak]\n"), "{text}");
        // Headed as threads, not fds.
        assert!(
            text.contains("top 1 of 1 thread sites that grew or are new, by threads held:\n"),
            "{text}"
        );
        assert!(!text.contains("fd sites"), "{text}");
    }

    /// The same program twice, at other addresses (ASLR) and another module path.
    fn two_runs() -> (Snapshot, Snapshot) {
        let run = |pid, base: u64, module: &str, leak: i64, cache: i64, extra: bool| {
            let a = |off: u64| format!("{:#x}", base + off);
            let mut sites = vec![
                site(
                    leak * 100,
                    leak,
                    "leak",
                    vec![
                        frame(&a(0x10), module, Some("leak_fn"), 10),
                        frame(&a(0x90), module, Some("main"), 50),
                    ],
                ),
                site(
                    cache * 10,
                    cache,
                    "stable",
                    vec![
                        frame(&a(0x20), module, Some("cache_put"), 20),
                        frame(&a(0x94), module, Some("main"), 51),
                    ],
                ),
                // One line, two call instructions: two sites, one key.
                site(
                    30,
                    3,
                    "stable",
                    vec![
                        frame(&a(0x30), module, Some("twice"), 30),
                        frame(&a(0x98), module, Some("main"), 52),
                    ],
                ),
                site(
                    20,
                    2,
                    "stable",
                    vec![
                        frame(&a(0x34), module, Some("twice"), 30),
                        frame(&a(0x98), module, Some("main"), 52),
                    ],
                ),
                // Unsymbolized frames: keyed by module.
                site(
                    7,
                    1,
                    "unknown",
                    vec![frame(&a(0x40), "/lib/libfoo.so", None, 0)],
                ),
            ];
            if extra {
                sites.push(site(
                    5000,
                    50,
                    "leak",
                    vec![frame(&a(0x50), module, Some("late_fn"), 40)],
                ));
            } else {
                sites.push(site(
                    300,
                    3,
                    "stable",
                    vec![frame(&a(0x60), module, Some("gone_fn"), 60)],
                ));
            }
            Snapshot::from_json(&format!("run{pid}.json"), &report(pid, sites)).unwrap()
        };
        (
            run(1, 0x5555_0000_0000, "/usr/bin/app", 10, 40, false),
            run(
                2,
                0x7777_0000_0000,
                "/proc/99/root/usr/bin/app",
                200,
                40,
                true,
            ),
        )
    }

    #[test]
    fn keys_ignore_addresses_and_directories() {
        let a = frame("0x1", "/usr/bin/app", Some("f"), 3);
        let b = frame("0x2", "/other/root/usr/bin/app", Some("f"), 3);
        assert_eq!(FrameKey::of(&a), FrameKey::of(&b));
        assert_ne!(
            FrameKey::of(&a),
            FrameKey::of(&frame("0x1", "/usr/bin/app", Some("f"), 4))
        );
        let u = FrameKey::of(&frame("0x1", "/lib/libc.so.6", None, 0));
        assert_eq!(
            (u.module.as_deref(), u.function, u.line),
            (Some("libc.so.6"), None, None)
        );
        assert!(site_key(&json!({"stack_captured": false, "frames": []})).is_empty());
    }

    #[test]
    fn diff_ranks_by_growth_and_matches_by_stack() {
        let (old, new) = two_runs();
        assert_eq!(old.sites.len(), 5, "the two `twice` sites are one key");
        let d = compare(&old, &new);
        let order: Vec<(Status, i64, i64)> = d
            .sites
            .iter()
            .map(|e| (e.status, e.size_diff, e.count_diff))
            .collect();
        assert_eq!(
            order,
            vec![
                (Status::Grew, 19000, 190),
                (Status::New, 5000, 50),
                (Status::Unchanged, 0, 0),
                (Status::Unchanged, 0, 0),
                (Status::Unchanged, 0, 0),
                (Status::Vanished, -300, -3),
            ]
        );
        assert_eq!(d.sites[0].old_bytes, 1000);
        assert_eq!(d.sites[0].new_bytes, 20000);
        assert_eq!(d.sites[0].verdict.as_deref(), Some("leak"));
        assert_eq!(d.sites[2].new_bytes, 400, "cache, unchanged");
        assert_eq!(d.sites[3].new_bytes, 50, "two sites of one line, added up");
        assert_eq!(
            d.totals,
            DiffTotals {
                size_diff: 20000 + 400 + 50 + 7 + 5000 - (1000 + 400 + 50 + 7 + 300),
                count_diff: 200 + 40 + 5 + 1 + 50 - (10 + 40 + 5 + 1 + 3),
                new: 1,
                grew: 1,
                unchanged: 3,
                shrank: 0,
                freed: 0,
                vanished: 1,
            }
        );
    }

    /// A site of OLD that NEW lists in `freed_sites` was freed, not lost; one
    /// NEW holds again after OLD saw it freed grew from nothing.
    #[test]
    fn freed_sites_are_freed_not_vanished() {
        let f = |name, line| vec![frame("0x10", "/usr/bin/app", Some(name), line)];
        let mut old = report(1, vec![site(500, 5, "leak", f("freed_fn", 10))]);
        old["freed_sites"] = json!([site(0, 0, "transient", f("back_fn", 20))]);
        let mut new = report(2, vec![site(70, 7, "growing", f("back_fn", 20))]);
        new["freed_sites"] = json!([site(0, 0, "transient", f("freed_fn", 10))]);
        new["freed_sites_left_out"] = json!({"sites": 4, "alloc_calls": 9, "alloc_bytes": 90});
        let old = Snapshot::from_json("old.json", &old).unwrap();
        let new = Snapshot::from_json("new.json", &new).unwrap();
        assert_eq!(
            (new.info.freed_sites, new.info.freed_sites_left_out),
            (1, 4)
        );
        let d = compare(&old, &new);
        let got: Vec<(Status, i64, i64, i64, Option<&str>)> = d
            .sites
            .iter()
            .map(|e| {
                let v = e.verdict.as_deref();
                (e.status, e.size_diff, e.count_diff, e.new_bytes, v)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (Status::Grew, 70, 7, 70, Some("growing")),
                (Status::Freed, -500, -5, 0, Some("transient")),
            ]
        );
        assert_eq!((d.totals.freed, d.totals.vanished, d.totals.new), (1, 0, 0));
        let t = d.to_text(10);
        assert!(
            t.contains("sites: 1 grew, 0 new, 0 shrank, 1 freed, 0 vanished, 0 unchanged"),
            "{t}"
        );
        assert!(
            t.contains("#1 FREED -500 B (-5 blocks): 500 B in 5 blocks -> 0 B [transient]"),
            "{t}"
        );
        // Had NEW not listed it, it would have vanished; with freed sites left
        // out of NEW's JSON, the text says it may be among them.
        let mut new = report(2, vec![]);
        new["freed_sites_left_out"] = json!({"sites": 4, "alloc_calls": 9, "alloc_bytes": 90});
        let new = Snapshot::from_json("new.json", &new).unwrap();
        let t = compare(&old, &new).to_text(10);
        assert!(t.contains("VANISHED -500 B"), "{t}");
        assert!(
            t.contains("left 4 freed sites out of its JSON: a vanished site may be one"),
            "{t}"
        );
    }

    #[test]
    fn text_and_json() {
        let (old, new) = two_runs();
        let d = compare(&old, &new);
        let t = d.to_text(10);
        assert!(t.contains("memtrace diff: run1.json -> run2.json"), "{t}");
        assert!(
            t.contains("old: run1.json (pid 1 (/usr/bin/app), traced 2.0s"),
            "{t}"
        );
        assert!(
            t.contains("sites: 1 grew, 1 new, 0 shrank, 0 freed, 1 vanished, 3 unchanged"),
            "{t}"
        );
        assert!(
            t.contains("top 2 of 2 sites that grew or are new, by growth:"),
            "{t}"
        );
        assert!(
            t.contains("#1 +18.6 KiB (+190 blocks): 1000 B in 10 blocks -> 19.5 KiB in 200 blocks [leak, +10 B/s]"),
            "{t}"
        );
        assert!(
            t.contains("    leak_fn at /src/app.c:10\n    main at /src/app.c:50\n"),
            "{t}"
        );
        assert!(
            t.contains("#2 NEW +4.9 KiB (+50 blocks): 0 B -> 4.9 KiB in 50 blocks [leak"),
            "{t}"
        );
        assert!(
            t.contains("top 1 of 1 sites that shrank, were freed or vanished:"),
            "{t}"
        );
        assert!(
            t.contains("#1 VANISHED -300 B (-3 blocks): 300 B in 3 blocks -> 0 B [stable]"),
            "{t}"
        );
        assert!(!t.contains("0x"), "no addresses: {t}");
        let t1 = d.to_text(1);
        assert!(t1.contains("top 1 of 2 sites that grew"), "{t1}");
        assert!(!t1.contains("late_fn"), "{t1}");
        let v: Value = serde_json::from_str(&d.to_json()).unwrap();
        assert_eq!(v["schema"], "memtrace-diff/1");
        assert_eq!(v["sites"].as_array().unwrap().len(), 6);
        assert_eq!(v["sites"][0]["status"], "grew");
        assert_eq!(v["sites"][0]["size_diff"], 19000);
        assert_eq!(v["sites"][1]["status"], "new");
        assert_eq!(v["sites"][5]["status"], "vanished");
        assert_eq!(v["sites"][0]["frames"][0]["function"], "leak_fn");
        assert_eq!(v["totals"]["vanished"], 1);
        assert_eq!(v["old"]["pid"], 1);
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        let e = Snapshot::from_json("x.json", &json!({"schema": "memtrace-diff/1"})).unwrap_err();
        assert!(e.to_string().contains("not a memtrace report"), "{e}");
        let e = Snapshot::from_json("x.json", &json!([1, 2])).unwrap_err();
        assert!(
            e.to_string().contains("x.json is not a memtrace report"),
            "{e}"
        );
        let e = Snapshot::from_json("x.json", &json!({"schema": "memtrace-report/1"})).unwrap_err();
        assert!(e.to_string().contains("no `sites`"), "{e}");
        let e = Snapshot::load(Path::new("/nonexistent/memtrace.json")).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read the report /nonexistent/memtrace.json"));
        // An older report without verdicts still compares.
        let old = json!({"schema": "memtrace-report/1", "sites": [
            {"outstanding_bytes": 5, "outstanding_blocks": 1, "frames": []}]});
        let s = Snapshot::from_json("old.json", &old).unwrap();
        assert_eq!(s.sites[&Vec::new()].verdict, None);
    }

    #[test]
    fn counts_that_no_report_holds_are_refused() {
        let frames = vec![frame("0x10", "/usr/bin/app", Some("f"), 1)];
        for bad in [json!(-5), json!(u64::MAX), json!(1.5), json!("12")] {
            let mut v = report(1, vec![site(10, 1, "leak", frames.clone())]);
            v["sites"][0]["outstanding_bytes"] = bad.clone();
            let e = Snapshot::from_json("r.json", &v).unwrap_err().to_string();
            assert!(
                e.contains("site 1") && e.contains("outstanding_bytes"),
                "{bad}: {e}"
            );
        }
        let mut v = report(1, vec![site(10, 1, "leak", frames.clone())]);
        v["totals"]["outstanding_blocks"] = json!(-1);
        assert!(Snapshot::from_json("r.json", &v).is_err());
        // Two sites of one key whose sum passes i64: refused, not wrapped.
        let big = i64::MAX;
        let v = report(1, vec![site(10, 1, "leak", frames.clone())]);
        let mut v2 = v.clone();
        v2["sites"] = json!([
            site(big, 1, "leak", frames.clone()),
            site(big, 1, "leak", frames)
        ]);
        v2["totals"]["outstanding_bytes"] = json!(0);
        assert!(Snapshot::from_json("r.json", &v2).is_err());
        assert!(Snapshot::from_json("r.json", &v).is_ok());
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("memtrace-diff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A character device that never ends.
        let e = format!("{:#}", Snapshot::load(Path::new("/dev/zero")).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        // A FIFO with no writer: opening it must not block.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = format!("{:#}", Snapshot::load(&fifo).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        // A sparse file past the bound: refused from its size, not read.
        let big = dir.join("big.json");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_REPORT_BYTES + 1)
            .unwrap();
        let e = format!("{:#}", Snapshot::load(&big).unwrap_err());
        assert!(e.contains("larger than memtrace diff reads"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Inputs the fuzz target `report_json` panicked on (overflow checks,
    /// Duration): now each is read or refused, never a panic.
    #[test]
    fn extreme_numbers_do_not_panic() {
        let max = i64::MAX;
        let min_totals = json!({"schema": "memtrace-report/1",
            "totals": {"outstanding_bytes": i64::MIN, "outstanding_blocks": i64::MIN},
            "sites": []});
        assert!(Snapshot::from_json("min.json", &min_totals).is_err());
        let summed = json!({"schema": "memtrace-report/1",
            "sites": [{"outstanding_bytes": max, "outstanding_blocks": max, "frames": []},
                      {"outstanding_bytes": max, "outstanding_blocks": max, "frames": []}]});
        assert!(Snapshot::from_json("summed.json", &summed).is_err());
        let huge = json!({"schema": "memtrace-report/1", "duration_s": 1e300,
            "totals": {"outstanding_bytes": max, "outstanding_blocks": max},
            "sites": [{"outstanding_bytes": max, "outstanding_blocks": max, "frames": []}]});
        let s = Snapshot::from_json("huge.json", &huge).unwrap();
        assert_eq!(s.sites[&Vec::new()].bytes, max);
        let empty = json!({"schema": "memtrace-report/1", "sites": []});
        let e = Snapshot::from_json("empty.json", &empty).unwrap();
        for (old, new) in [(&s, &e), (&e, &s), (&s, &s)] {
            let d = compare(old, new);
            let _ = d.to_text(10);
            let _ = d.to_json();
        }
        assert_eq!(compare(&s, &e).sites[0].size_diff, -max);
    }
}
