//! The final report: its data (schema `memtrace-report/1`) and its renderings.
use std::fmt::Write as _;

use serde::Serialize;

pub use crate::symbolize::Frame;
use crate::{
    collect::Counters,
    units::{format_bytes, format_count, format_duration},
};

pub const SCHEMA: &str = "memtrace-report/1";

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub memtrace_version: &'static str,
    pub target: TargetInfo,
    pub started_at: String,
    pub ended_at: String,
    pub duration_s: f64,
    /// Why tracing ended: `signal`, `duration`, `target-exited`.
    pub end_reason: &'static str,
    pub sampling: Sampling,
    pub totals: Totals,
    /// Every counter behind `dropped_events` and `stack_errors`, by cause.
    pub drops: Drops,
    pub allocator: AllocatorInfo,
    pub min_age_s: f64,
    pub sites: Vec<Site>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetInfo {
    pub pid: u32,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    pub exited: bool,
    pub exit_status: Option<i32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sampling {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub alloc_calls: u64,
    pub free_calls: u64,
    pub alloc_bytes: u64,
    pub outstanding_blocks: u64,
    pub outstanding_bytes: u64,
    pub dropped_events: u64,
    pub stack_errors: u64,
    /// Frees of blocks allocated before memtrace attached (normal in attach mode).
    pub free_unknown: u64,
    /// Allocator calls that returned NULL or an error.
    pub failed_allocs: u64,
    /// Sites (distinct stacks) seen while tracing, with or without outstanding blocks.
    pub sites_seen: u64,
    /// Allocator calls made by the allocator itself (glibc's realloc(p, 0) calls
    /// free): part of the user's call, not counted on their own.
    pub allocator_internal_calls: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Drops {
    pub alloc_map_full: u64,
    pub pending_map_full: u64,
    pub site_map_full: u64,
    pub out_pointer_read_errors: u64,
    pub unmatched_returns: u64,
    pub missed_returns: u64,
    pub stack_read_errors: u64,
    pub stack_map_full: u64,
    pub stack_hash_collisions: u64,
    pub address_reused: u64,
    /// Frames whose function or line could not be resolved, by reason.
    pub unresolved_frames: std::collections::BTreeMap<String, u64>,
}

impl Drops {
    pub fn from_counters(c: &Counters) -> Self {
        Drops {
            alloc_map_full: c.dropped_alloc_map_full,
            pending_map_full: c.dropped_pending_map_full,
            site_map_full: c.dropped_site_map_full,
            out_pointer_read_errors: c.out_pointer_read_errors,
            unmatched_returns: c.unmatched_returns,
            missed_returns: c.missed_returns,
            stack_read_errors: c.stack_read_errors,
            stack_map_full: c.stack_map_full,
            stack_hash_collisions: c.stack_hash_collisions,
            address_reused: c.address_reused,
            unresolved_frames: Default::default(),
        }
    }

    fn nonzero(&self) -> Vec<(&'static str, u64)> {
        [
            ("allocation map full", self.alloc_map_full),
            ("in-flight map full", self.pending_map_full),
            ("site map full", self.site_map_full),
            (
                "posix_memalign result unreadable",
                self.out_pointer_read_errors,
            ),
            ("return without entry", self.unmatched_returns),
            ("return never seen", self.missed_returns),
            ("stack unreadable", self.stack_read_errors),
            ("stack map full", self.stack_map_full),
            ("stack hash collision", self.stack_hash_collisions),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct AllocatorInfo {
    pub module: String,
    pub functions: Vec<String>,
    pub probes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Site {
    pub outstanding_blocks: u64,
    pub outstanding_bytes: u64,
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
    pub oldest_age_s: Option<f64>,
    /// False for the site that collects allocations whose stack was not captured.
    pub stack_captured: bool,
    pub frames: Vec<Frame>,
}

impl Report {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a report always serializes");
        s.push('\n');
        s
    }

    pub fn to_text(&self, top: usize) -> String {
        let mut o = String::new();
        let t = &self.target;
        let exe = t.exe.as_deref().unwrap_or("?");
        let _ = write!(
            o,
            "memtrace report: pid {} ({exe}), traced for {}",
            t.pid,
            format_duration(std::time::Duration::from_secs_f64(self.duration_s))
        );
        match (t.exited, t.exit_status) {
            (true, Some(s)) => {
                let _ = writeln!(o, ", target exited with status {s}");
            }
            (true, None) => {
                let _ = writeln!(o, ", target exited");
            }
            _ => {
                let _ = writeln!(o);
            }
        }
        let tot = &self.totals;
        let _ = writeln!(
            o,
            "outstanding: {} in {} blocks, from {} allocations ({}) and {} frees while traced",
            format_bytes(tot.outstanding_bytes as i64),
            format_count(tot.outstanding_blocks),
            format_count(tot.alloc_calls),
            format_bytes(tot.alloc_bytes as i64),
            format_count(tot.free_calls),
        );
        if tot.free_unknown > 0 {
            let _ = writeln!(
                o,
                "{} frees were of blocks allocated before memtrace attached",
                format_count(tot.free_unknown)
            );
        }
        let drops = self.drops.nonzero();
        if drops.is_empty() {
            let _ = writeln!(
                o,
                "nothing dropped: every allocator call was recorded with its stack"
            );
        } else {
            let parts: Vec<String> = drops.iter().map(|(n, c)| format!("{c} {n}")).collect();
            let _ = writeln!(
                o,
                "NOT COMPLETE: {} events dropped, {} stacks lost ({})",
                format_count(tot.dropped_events),
                format_count(tot.stack_errors),
                parts.join(", ")
            );
        }
        let min_age = if self.min_age_s > 0.0 {
            format!(
                " older than {}",
                format_duration(std::time::Duration::from_secs_f64(self.min_age_s))
            )
        } else {
            String::new()
        };
        if self.sites.is_empty() {
            let _ = writeln!(o, "\nno outstanding allocations{min_age}");
            return o;
        }
        let shown = self.sites.len().min(top);
        let _ = writeln!(
            o,
            "\ntop {shown} of {} sites by outstanding bytes{min_age}:",
            self.sites.len()
        );
        for (i, site) in self.sites.iter().take(top).enumerate() {
            let age = site
                .oldest_age_s
                .map(|a| {
                    format!(
                        ", oldest {}",
                        format_duration(std::time::Duration::from_secs_f64(a))
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "\n#{} {} in {} blocks ({} allocations, {} in all{age})",
                i + 1,
                format_bytes(site.outstanding_bytes as i64),
                format_count(site.outstanding_blocks),
                format_count(site.alloc_calls),
                format_bytes(site.alloc_bytes as i64),
            );
            if !site.stack_captured {
                let _ = writeln!(o, "    [stack not captured]");
            }
            for f in &site.frames {
                let _ = writeln!(o, "    {}", frame_text(f));
            }
        }
        let rest = self.sites.len().saturating_sub(top);
        if rest > 0 {
            let bytes: u64 = self
                .sites
                .iter()
                .skip(top)
                .map(|s| s.outstanding_bytes)
                .sum();
            let _ = writeln!(
                o,
                "\n... and {rest} more sites holding {} (all in --format json)",
                format_bytes(bytes as i64)
            );
        }
        o
    }
}

pub fn frame_text(f: &Frame) -> String {
    let func = f.function.as_deref().unwrap_or("??");
    let mut s = format!("{:#014x} {func}", f.address);
    match (&f.file, f.line) {
        (Some(file), Some(line)) => {
            let _ = write!(s, " at {file}:{line}");
        }
        (Some(file), None) => {
            let _ = write!(s, " at {file}");
        }
        _ => {
            if let Some(m) = &f.module {
                let _ = write!(s, " in {m}");
            }
        }
    }
    if f.inlined {
        s.push_str(" (inlined)");
    }
    s
}

/// UTC time as RFC 3339 (`2026-11-23T07:00:00Z`).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            schema: SCHEMA,
            memtrace_version: "0.1.0",
            target: TargetInfo {
                pid: 42,
                exe: Some("/usr/bin/app".into()),
                cmdline: vec!["app".into()],
                exited: true,
                exit_status: Some(7),
            },
            started_at: "2026-11-23T07:00:00Z".into(),
            ended_at: "2026-11-23T07:00:12Z".into(),
            duration_s: 12.5,
            end_reason: "target-exited",
            sampling: Sampling { mode: "exact" },
            totals: Totals {
                alloc_calls: 10,
                free_calls: 3,
                alloc_bytes: 1000,
                outstanding_blocks: 7,
                outstanding_bytes: 700,
                ..Default::default()
            },
            drops: Drops::default(),
            allocator: AllocatorInfo {
                module: "/lib/libc.so.6".into(),
                functions: vec!["malloc".into()],
                probes: 2,
            },
            min_age_s: 0.0,
            sites: vec![Site {
                outstanding_blocks: 7,
                outstanding_bytes: 700,
                alloc_calls: 10,
                alloc_bytes: 1000,
                oldest_age_s: Some(3.2),
                stack_captured: true,
                frames: vec![
                    Frame {
                        address: 0x401136,
                        module: Some("/usr/bin/app".into()),
                        function: Some("helper".into()),
                        file: Some("/src/a.c".into()),
                        line: Some(9),
                        inlined: true,
                        unresolved: None,
                    },
                    Frame {
                        address: 0x401136,
                        module: Some("/usr/bin/app".into()),
                        function: Some("make_buffer".into()),
                        file: Some("/src/a.c".into()),
                        line: Some(38),
                        inlined: false,
                        unresolved: None,
                    },
                ],
            }],
        }
    }

    #[test]
    fn json_follows_the_contract() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(v["schema"], "memtrace-report/1");
        assert_eq!(v["target"]["exit_status"], 7);
        assert_eq!(v["sampling"]["mode"], "exact");
        for k in [
            "alloc_calls",
            "free_calls",
            "alloc_bytes",
            "outstanding_blocks",
            "outstanding_bytes",
            "dropped_events",
            "stack_errors",
        ] {
            assert!(v["totals"][k].is_u64(), "totals.{k}");
        }
        let f = &v["sites"][0]["frames"][0];
        assert_eq!(f["address"], "0x401136");
        assert_eq!(f["inlined"], true);
        assert_eq!(v["sites"][0]["frames"][1]["line"], 38);
    }

    #[test]
    fn text_shows_sites_and_limits() {
        let r = sample();
        let t = r.to_text(10);
        assert!(t.contains("700 B in 7 blocks"), "{t}");
        assert!(t.contains("make_buffer at /src/a.c:38"), "{t}");
        assert!(t.contains("(inlined)"), "{t}");
        assert!(t.contains("exited with status 7"), "{t}");
        assert!(t.contains("nothing dropped"), "{t}");
        let t0 = r.to_text(0);
        assert!(t0.contains("and 1 more sites"), "{t0}");
    }

    #[test]
    fn text_flags_drops() {
        let mut r = sample();
        r.drops.missed_returns = 3;
        r.totals.dropped_events = 3;
        let t = r.to_text(10);
        assert!(t.contains("NOT COMPLETE: 3 events dropped"), "{t}");
        assert!(t.contains("3 return never seen"), "{t}");
    }

    #[test]
    fn times_are_rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_417_200);
        assert_eq!(rfc3339(t), "2026-11-23T07:00:00Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
