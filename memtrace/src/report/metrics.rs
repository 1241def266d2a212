//! The live figures as Prometheus metrics, in the Prometheus text format or
//! in OpenMetrics, for `--listen`.
//!
//! The series are bounded: one per figure, plus one per fd kind (a fixed set,
//! see `process::fds`), plus, only when asked for, one per site for the top
//! sites by outstanding bytes (`--metrics-top-sites N`, N at most
//! [`MAX_TOP_SITES`]): a label per stack would grow without bound, and
//! stacks belong in a profile (`/debug/pprof/heap`), not in a time series
//! database. Rates are `rate()` over the `_total` counters.
use std::{collections::BTreeMap, fmt::Write as _};

use crate::process::stat::ProcStat;

/// The most per-site series `--metrics-top-sites` may ask for.
pub const MAX_TOP_SITES: usize = 50;

/// One site in the per-site series: its name (innermost function, file:line).
#[derive(Clone, Debug, PartialEq)]
pub struct SiteMetric {
    pub name: String,
    pub outstanding_bytes: i64,
    pub outstanding_blocks: i64,
}

/// What one scrape shows: the figures of the last interval.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub pid: u32,
    /// 0 in exact mode; figures are estimates otherwise.
    pub sampling_mean_bytes: u64,
    pub outstanding_bytes: i64,
    pub outstanding_blocks: i64,
    pub alloc_calls: u64,
    pub free_calls: u64,
    pub alloc_bytes: u64,
    pub dropped_events: u64,
    pub stack_errors: u64,
    /// Sites holding outstanding blocks.
    pub sites: u64,
    pub process: Option<ProcStat>,
    pub fd_kinds: Option<BTreeMap<&'static str, u64>>,
    pub top_sites: Vec<SiteMetric>,
    /// Seconds since tracing began.
    pub traced_seconds: f64,
    /// The heap sites' verdicts: judged from the live history at a
    /// history sample, or the newest `--snapshot-every` snapshot's when it
    /// is newer.
    pub verdicts: Option<SiteVerdicts>,
    /// The traced fds, threads and mappings (None when not traced).
    pub resources: Option<ResourceFigures>,
}

/// The heap sites' verdicts at one moment: what the final report would
/// have said had tracing ended then.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SiteVerdicts {
    pub counts: super::VerdictCounts,
    /// When they were judged, in seconds since tracing began.
    pub traced_seconds: f64,
}

/// The fds, threads and mappings created while traced that sites hold now,
/// and their sites' verdicts, judged at the last interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceFigures {
    /// Per resource (`fd`, `thread`, `mapping`): its sites' verdicts.
    pub verdicts: Vec<(&'static str, super::VerdictCounts)>,
    pub held: Vec<HeldKind>,
}

/// The items of one kind of a resource held now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeldKind {
    /// `fd`, `thread` or `mapping`.
    pub resource: &'static str,
    /// The site kind (`socket`, `thread`, `anon_mapping`...).
    pub kind: String,
    pub outstanding: u64,
    /// Bytes held (mappings).
    pub bytes: Option<u64>,
}

/// Each verdict's name and count.
fn verdict_list(c: &super::VerdictCounts) -> [(&'static str, u64); 5] {
    [
        ("leak", c.leak),
        ("growing", c.growing),
        ("stable", c.stable),
        ("transient", c.transient),
        ("unknown", c.unknown),
    ]
}

/// The two exposition formats and their content types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    Prometheus,
    OpenMetrics,
}

impl Exposition {
    /// OpenMetrics when the scraper's `Accept` header asks for it.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Exposition::OpenMetrics,
            _ => Exposition::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A label value as both formats quote it.
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes the metrics in one of the two formats.
struct Writer {
    out: String,
    format: Exposition,
    pid: String,
}

impl Writer {
    /// A metric family: its HELP and TYPE lines. A counter's family is named
    /// without `_total` in OpenMetrics, with it in the Prometheus format.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let family = match (self.format, kind) {
            (Exposition::OpenMetrics, "counter") => name.trim_end_matches("_total"),
            _ => name,
        };
        let _ = writeln!(self.out, "# HELP {family} {help}");
        let _ = writeln!(self.out, "# TYPE {family} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}{{pid=\"{}\"", self.pid);
        for (k, v) in labels {
            let _ = write!(self.out, ",{k}=\"{}\"", label_value(v));
        }
        let _ = writeln!(self.out, "}} {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

impl Metrics {
    pub fn render(&self, format: Exposition) -> String {
        let mut w = Writer {
            out: String::new(),
            format,
            pid: self.pid.to_string(),
        };
        w.one(
            "memtrace_outstanding_bytes",
            "gauge",
            "Bytes allocated while traced and not freed (an estimate when sampling).",
            self.outstanding_bytes,
        );
        w.one(
            "memtrace_outstanding_blocks",
            "gauge",
            "Blocks allocated while traced and not freed.",
            self.outstanding_blocks,
        );
        w.one(
            "memtrace_sites",
            "gauge",
            "Distinct allocation stacks holding outstanding blocks.",
            self.sites,
        );
        w.one(
            "memtrace_allocations_total",
            "counter",
            "Allocator calls that allocated, while traced.",
            self.alloc_calls,
        );
        w.one(
            "memtrace_frees_total",
            "counter",
            "Calls to free while traced.",
            self.free_calls,
        );
        w.one(
            "memtrace_allocated_bytes_total",
            "counter",
            "Bytes allocated while traced.",
            self.alloc_bytes,
        );
        w.one(
            "memtrace_dropped_events_total",
            "counter",
            "Allocator events missing from the figures (see the report's drops).",
            self.dropped_events,
        );
        w.one(
            "memtrace_stack_errors_total",
            "counter",
            "Allocations kept without their stack.",
            self.stack_errors,
        );
        w.one(
            "memtrace_sampling_mean_bytes",
            "gauge",
            "Mean bytes between sampled allocations; 0 when every allocation is recorded.",
            self.sampling_mean_bytes,
        );
        w.one(
            "memtrace_traced_seconds",
            "gauge",
            "Seconds since tracing began.",
            format!("{:.3}", self.traced_seconds),
        );
        self.process_families(&mut w);
        self.verdict_families(&mut w);
        self.resource_families(&mut w);
        self.site_families(&mut w);
        if format == Exposition::OpenMetrics {
            w.out.push_str("# EOF\n");
        }
        w.out
    }

    fn process_families(&self, w: &mut Writer) {
        if let Some(p) = &self.process {
            w.one(
                "memtrace_process_resident_bytes",
                "gauge",
                "The target's resident set size.",
                p.rss_bytes,
            );
            w.one(
                "memtrace_process_anonymous_bytes",
                "gauge",
                "The target's anonymous resident memory (where malloc'ed memory lives).",
                p.rss_anon_bytes,
            );
            w.one(
                "memtrace_process_virtual_bytes",
                "gauge",
                "The target's virtual size.",
                p.vm_size_bytes,
            );
            w.one(
                "memtrace_process_threads",
                "gauge",
                "The target's threads.",
                p.threads,
            );
        }
        if let Some(kinds) = &self.fd_kinds {
            w.family(
                "memtrace_process_open_fds",
                "gauge",
                "The target's open file descriptors by kind.",
            );
            for (kind, n) in kinds {
                w.sample("memtrace_process_open_fds", &[("kind", kind)], n);
            }
        }
    }

    fn verdict_families(&self, w: &mut Writer) {
        let Some(v) = &self.verdicts else { return };
        w.family(
            "memtrace_sites_by_verdict",
            "gauge",
            "Heap sites by verdict (leak, growing, stable, transient, unknown), judged from \
             the live history, or by the newest --snapshot-every snapshot when newer.",
        );
        for (verdict, n) in verdict_list(&v.counts) {
            w.sample("memtrace_sites_by_verdict", &[("verdict", verdict)], n);
        }
        w.one(
            "memtrace_verdicts_traced_seconds",
            "gauge",
            "When memtrace_sites_by_verdict was judged, in seconds since tracing began.",
            format!("{:.3}", v.traced_seconds),
        );
    }

    fn resource_families(&self, w: &mut Writer) {
        let Some(r) = &self.resources else { return };
        w.family(
            "memtrace_resource_sites_by_verdict",
            "gauge",
            "Sites holding fds, threads or mappings created while traced, by resource and \
             verdict, judged at the last interval.",
        );
        for (resource, counts) in &r.verdicts {
            for (verdict, n) in verdict_list(counts) {
                let labels = [("resource", *resource), ("verdict", verdict)];
                w.sample("memtrace_resource_sites_by_verdict", &labels, n);
            }
        }
        w.family(
            "memtrace_traced_resources",
            "gauge",
            "fds, threads and mappings created while traced and held now, by resource and \
             site kind.",
        );
        for h in &r.held {
            let labels = [("resource", h.resource), ("kind", h.kind.as_str())];
            w.sample("memtrace_traced_resources", &labels, h.outstanding);
        }
        w.family(
            "memtrace_traced_mapped_bytes",
            "gauge",
            "Bytes mapped by mmaps made while traced and still mapped, by kind.",
        );
        for h in r.held.iter().filter(|h| h.bytes.is_some()) {
            let labels = [("kind", h.kind.as_str())];
            w.sample(
                "memtrace_traced_mapped_bytes",
                &labels,
                h.bytes.unwrap_or(0),
            );
        }
    }

    fn site_families(&self, w: &mut Writer) {
        if self.top_sites.is_empty() {
            return;
        }
        w.family(
            "memtrace_site_outstanding_bytes",
            "gauge",
            "Outstanding bytes of the top sites (--metrics-top-sites), by innermost frame.",
        );
        for s in &self.top_sites {
            w.sample(
                "memtrace_site_outstanding_bytes",
                &[("site", &s.name)],
                s.outstanding_bytes,
            );
        }
        w.family(
            "memtrace_site_outstanding_blocks",
            "gauge",
            "Outstanding blocks of the top sites (--metrics-top-sites), by innermost frame.",
        );
        for s in &self.top_sites {
            w.sample(
                "memtrace_site_outstanding_blocks",
                &[("site", &s.name)],
                s.outstanding_blocks,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metrics {
        Metrics {
            pid: 42,
            outstanding_bytes: 3072,
            outstanding_blocks: 3,
            alloc_calls: 10,
            free_calls: 7,
            alloc_bytes: 9000,
            sites: 2,
            fd_kinds: Some([("file", 3), ("socket", 2)].into_iter().collect()),
            top_sites: vec![SiteMetric {
                name: "cache_put (cache.c:7) \"x\"\\".into(),
                outstanding_bytes: 3072,
                outstanding_blocks: 3,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn resources_by_verdict_and_kind() {
        let t = sample().render(Exposition::Prometheus);
        assert!(!t.contains("memtrace_traced_resources"), "{t}");
        let m = Metrics {
            resources: Some(ResourceFigures {
                verdicts: vec![(
                    "thread",
                    crate::report::VerdictCounts {
                        leak: 2,
                        ..Default::default()
                    },
                )],
                held: vec![
                    HeldKind {
                        resource: "thread",
                        kind: "thread".into(),
                        outstanding: 24,
                        bytes: None,
                    },
                    HeldKind {
                        resource: "mapping",
                        kind: "anon_mapping".into(),
                        outstanding: 3,
                        bytes: Some(12288),
                    },
                ],
            }),
            ..sample()
        };
        let t = m.render(Exposition::Prometheus);
        for line in [
            "memtrace_resource_sites_by_verdict{pid=\"42\",resource=\"thread\",verdict=\"leak\"} 2\n",
            "memtrace_resource_sites_by_verdict{pid=\"42\",resource=\"thread\",verdict=\"unknown\"} 0\n",
            "memtrace_traced_resources{pid=\"42\",resource=\"thread\",kind=\"thread\"} 24\n",
            "memtrace_traced_resources{pid=\"42\",resource=\"mapping\",kind=\"anon_mapping\"} 3\n",
            "memtrace_traced_mapped_bytes{pid=\"42\",kind=\"anon_mapping\"} 12288\n",
        ] {
            assert!(t.contains(line), "{line}{t}");
        }
        assert!(!t.contains("memtrace_traced_mapped_bytes{pid=\"42\",kind=\"thread\""));
    }

    #[test]
    fn verdicts_once_judged() {
        let t = sample().render(Exposition::Prometheus);
        assert!(!t.contains("verdict"), "{t}");
        let m = Metrics {
            verdicts: Some(SiteVerdicts {
                counts: crate::report::VerdictCounts {
                    leak: 2,
                    stable: 5,
                    ..Default::default()
                },
                traced_seconds: 300.25,
            }),
            ..sample()
        };
        let t = m.render(Exposition::OpenMetrics);
        assert!(
            t.contains("# TYPE memtrace_sites_by_verdict gauge\n"),
            "{t}"
        );
        assert!(
            t.contains("memtrace_sites_by_verdict{pid=\"42\",verdict=\"leak\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("memtrace_sites_by_verdict{pid=\"42\",verdict=\"growing\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("memtrace_verdicts_traced_seconds{pid=\"42\"} 300.250\n"),
            "{t}"
        );
    }

    #[test]
    fn prometheus_text() {
        let t = sample().render(Exposition::Prometheus);
        assert!(t.contains("# TYPE memtrace_allocations_total counter\nmemtrace_allocations_total{pid=\"42\"} 10\n"), "{t}");
        assert!(
            t.contains("memtrace_outstanding_bytes{pid=\"42\"} 3072\n"),
            "{t}"
        );
        assert!(
            t.contains("memtrace_process_open_fds{pid=\"42\",kind=\"socket\"} 2\n"),
            "{t}"
        );
        assert!(t.contains(r#"memtrace_site_outstanding_bytes{pid="42",site="cache_put (cache.c:7) \"x\"\\"} 3072"#), "{t}");
        assert!(!t.contains("# EOF"));
        // Every sample line is `name{labels} value`.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = l.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn openmetrics() {
        let t = sample().render(Exposition::OpenMetrics);
        assert!(
            t.contains(
                "# TYPE memtrace_allocations counter\nmemtrace_allocations_total{pid=\"42\"} 10\n"
            ),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"));
        assert_eq!(
            Exposition::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Exposition::OpenMetrics
        );
        assert_eq!(Exposition::negotiate(None), Exposition::Prometheus);
    }
}
