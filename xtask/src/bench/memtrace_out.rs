//! What memtrace says about one run: the totals, unwind tables and first
//! site of its JSON report, and the attach time of its `attached` line.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};

use super::fmt::fmt_bytes;
use super::json::Json;
use super::options::Config;

/// Bytes per unwind-table page entry in the kernel, next to `row_bytes`.
pub(super) const UNWIND_PAGE_BYTES: u64 = 32;

pub(super) struct Counts {
    pub(super) alloc_calls: u64,
    pub(super) free_calls: u64,
    pub(super) dropped_events: u64,
}

impl Counts {
    /// The workload's traced window holds exactly `pairs` + `kept` mallocs
    /// and `pairs` frees (warmup, stdout's buffer and thread teardown happen
    /// untraced), so any difference means memtrace missed or invented calls.
    /// A few extra are tolerated in case libc allocates behind the scenes.
    pub(super) fn ok(&self, pairs: u64, kept: u64) -> bool {
        let near = |n: u64, want: u64| n >= want && n <= want + 16;
        self.dropped_events == 0
            && near(self.alloc_calls, pairs + kept)
            && near(self.free_calls, pairs)
    }
}

/// The kernel memory of memtrace's unwind tables, from the report's
/// `unwind` object (any of its fields may be missing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Unwind {
    pub(super) modules: Option<u64>,
    pub(super) rows: Option<u64>,
    pub(super) row_bytes: Option<u64>,
    pub(super) pages: Option<u64>,
}

impl Unwind {
    pub(super) fn of(report: &Json) -> Option<Unwind> {
        let u = report.get("unwind")?;
        let f = |k: &str| u.get(k).and_then(Json::as_u64);
        Some(Unwind {
            modules: f("modules"),
            rows: f("rows"),
            row_bytes: f("row_bytes"),
            pages: f("pages"),
        })
    }

    /// `row_bytes` + `pages` x 32: None unless both are reported.
    pub(super) fn kernel_bytes(&self) -> Option<u64> {
        Some(self.row_bytes? + self.pages?.saturating_mul(UNWIND_PAGE_BYTES))
    }
}

/// The stack of the report's first site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SiteStack {
    /// Length of `sites[0].frames` (inlined frames included).
    pub(super) frames: usize,
    pub(super) inlined: usize,
    pub(super) outstanding_bytes: Option<u64>,
    /// Function of each frame, innermost first (`?` with the module's file
    /// name, or the address, when unknown).
    pub(super) functions: Vec<String>,
}

impl SiteStack {
    pub(super) fn of(report: &Json) -> Option<SiteStack> {
        let site = report.get("sites")?.at(0)?;
        let frames = site.get("frames")?.as_array()?;
        let functions = frames
            .iter()
            .map(|f| match f.get("function").and_then(Json::as_str) {
                Some(name) => name.to_string(),
                None => {
                    // The module's file name, else the address (a frame in
                    // no mapping: often a bogus one from a broken walk).
                    let at = match f.get("module").and_then(Json::as_str) {
                        Some(m) => m.rsplit('/').next().unwrap_or(m).to_string(),
                        None => f
                            .get("address")
                            .and_then(Json::as_str)
                            .unwrap_or("?")
                            .to_string(),
                    };
                    format!("?({at})")
                }
            })
            .collect();
        Some(SiteStack {
            frames: frames.len(),
            inlined: frames
                .iter()
                .filter(|f| f.get("inlined") == Some(&Json::Bool(true)))
                .count(),
            outstanding_bytes: site.get("outstanding_bytes").and_then(Json::as_u64),
            functions,
        })
    }

    pub(super) fn chain(&self) -> String {
        self.functions.join(" ← ")
    }
}

pub(super) struct MemtraceOut {
    pub(super) counts: Counts,
    pub(super) unwind: Option<Unwind>,
    pub(super) site: Option<SiteStack>,
    /// How long memtrace says attaching took (probes, and the unwind tables
    /// in the dwarf config), from its `attached ... in 2.9s` line.
    pub(super) attach_s: Option<f64>,
}

impl MemtraceOut {
    pub(super) fn from_json(text: &str, path: &Path) -> Result<MemtraceOut> {
        let json = Json::parse(text).with_context(|| format!("parsing {}", path.display()))?;
        let get = |k: &str| {
            json.get("totals")
                .and_then(|t| t.get(k))
                .and_then(Json::as_u64)
                .with_context(|| format!("no totals.{k} in {}", path.display()))
        };
        Ok(MemtraceOut {
            counts: Counts {
                alloc_calls: get("alloc_calls")?,
                free_calls: get("free_calls")?,
                dropped_events: get("dropped_events")?,
            },
            unwind: Unwind::of(&json),
            site: SiteStack::of(&json),
            attach_s: None,
        })
    }

    pub(super) fn summary(&self, pairs: u64, kept: u64, config: Config) -> String {
        let c = &self.counts;
        let mut s = format!(
            "JSON alloc_calls {} free_calls {} dropped {}: {}",
            c.alloc_calls,
            c.free_calls,
            c.dropped_events,
            if config == Config::MemtraceSampled {
                "sampled, not checked"
            } else if c.ok(pairs, kept) {
                "ok"
            } else {
                "MISMATCH"
            }
        );
        match &self.site {
            Some(st) => {
                let _ = write!(s, "; site: {} frames", st.frames);
            }
            None => s.push_str("; no site"),
        }
        if let Some(b) = self.unwind.as_ref().and_then(Unwind::kernel_bytes) {
            let _ = write!(s, "; tables {}", fmt_bytes(b));
        }
        s
    }
}

/// `... in 2.9s` / `... in 555ms` at the end of memtrace's attached line.
pub(super) fn attach_seconds(line: &str) -> Option<f64> {
    let d = line.rsplit_once(" in ")?.1.trim();
    let split = d.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = d.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit.trim() {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_report_fields() {
        let j = r#"{"schema":"memtrace-report/1","target":{"pid":5,"cmdline":["a}b\"c\u00e9\ud83d\ude00"]},
            "totals": { "alloc_calls": 300001, "free_calls" :300000, "dropped_events": 0, "rate": -1.5e3 },
            "unwind": {"modules": 5, "rows": 1000, "row_bytes": 16000, "pages": 10, "extra": [1, {"x": null}]},
            "sites":[{"outstanding_bytes": 4096, "alloc_calls": 1, "frames": [
                {"address": "0x1", "module": null, "function": null, "inlined": false},
                {"address": "0x2", "module": "/w", "function": "keep_block", "inlined": true},
                {"address": "0x2", "module": "/w", "function": "main", "inlined": false},
                {"address": "0x3", "module": "/lib/libc.so.6", "inlined": false}]}]}"#;
        let m = MemtraceOut::from_json(j, Path::new("x.json")).unwrap();
        assert_eq!(
            (
                m.counts.alloc_calls,
                m.counts.free_calls,
                m.counts.dropped_events
            ),
            (300001, 300000, 0)
        );
        assert!(m.counts.ok(300000, 1));
        assert!(!m.counts.ok(300000, 2));
        let u = m.unwind.unwrap();
        assert_eq!((u.modules, u.rows), (Some(5), Some(1000)));
        assert_eq!(u.kernel_bytes(), Some(16000 + 10 * 32));
        let site = m.site.unwrap();
        assert_eq!((site.frames, site.inlined), (4, 1));
        assert_eq!(site.outstanding_bytes, Some(4096));
        assert_eq!(site.chain(), "?(0x1) ← keep_block ← main ← ?(libc.so.6)");

        let v = Json::parse(j).unwrap();
        let cmd = v
            .get("target")
            .and_then(|t| t.get("cmdline"))
            .and_then(|c| c.at(0));
        assert_eq!(cmd.and_then(Json::as_str), Some("a}b\"cé😀"));
        assert_eq!(
            v.get("totals").and_then(|t| t.get("rate")),
            Some(&Json::Num("-1.5e3".into()))
        );

        // No unwind object, no sites: tolerated.
        let old = r#"{"totals":{"alloc_calls":1,"free_calls":1,"dropped_events":0},"sites":[]}"#;
        let m = MemtraceOut::from_json(old, Path::new("x.json")).unwrap();
        assert!(m.unwind.is_none() && m.site.is_none());
        // Partial unwind object: no memory figure.
        let partial =
            r#"{"totals":{"alloc_calls":1,"free_calls":1,"dropped_events":0},"unwind":{"rows":3}}"#;
        let m = MemtraceOut::from_json(partial, Path::new("x.json")).unwrap();
        assert_eq!(m.unwind.unwrap().kernel_bytes(), None);
        // Missing totals is an error; so is broken JSON.
        assert!(MemtraceOut::from_json(r#"{"sites":[]}"#, Path::new("x.json")).is_err());
        for bad in ["{", "[1,]", r#"{"a" 1}"#, "tru", "1 2", r#""\x""#] {
            assert!(Json::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn attach_line() {
        let l = "memtrace: attached to pid 1 (w): 17 probes on /x/libc.so.6 (malloc, free) in 2.9s";
        assert_eq!(attach_seconds(l), Some(2.9));
        assert_eq!(
            attach_seconds("memtrace: attached ... in 555ms"),
            Some(0.555)
        );
        assert_eq!(attach_seconds("memtrace: attached"), None);
    }
}
