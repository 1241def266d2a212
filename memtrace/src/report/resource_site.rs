//! One site type for every traced resource other than heap memory: a
//! creating stack that holds fds, threads or mappings at the end, with the
//! history and verdict a heap site has. What differs by resource is data:
//! its [`SiteDetail`] (the fields only it has, the items it holds) and its
//! [`Unit`] (counted, or in bytes). JSON by [`Serialize`] (field order is
//! the schema's, see docs/json-schema.md); text by [`write_sites`].
use std::fmt::Write;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::{Frames, TextStyle, VerdictCounts};
use crate::analyze::{Trend, Verdict};
use crate::escape::Escaped;
use crate::units::{counted, format_bytes};

/// What a resource site's history and growth are measured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Held items (fds, threads): `growth_per_s` is items per second.
    Count,
    /// Bytes (mappings): `growth_per_s` is bytes per second.
    Bytes,
}

/// The fields and items only one resource has.
#[derive(Clone, Debug, PartialEq)]
pub enum SiteDetail {
    Fd {
        /// The syscall family that created them: `open`, `socket`, `accept`,
        /// `socketpair`, `pipe`, `dup`, `eventfd`...
        origin: &'static str,
        /// Its fds (at most [`MAX_LISTED_FDS`](super::resources::MAX_LISTED_FDS),
        /// oldest first).
        fds: Vec<super::resources::FdInfo>,
    },
    Thread {
        alive: u64,
        /// Exited, neither joined nor detached: each holds its stack.
        exited_unjoined: u64,
        /// Its threads (at most [`MAX_LISTED_THREADS`](super::threads::MAX_LISTED_THREADS),
        /// oldest first).
        threads: Vec<super::threads::ThreadInfo>,
    },
    Mapping {
        /// MAP_SHARED (else private).
        shared: bool,
        /// Its ranges (at most [`MAX_LISTED_RANGES`](super::mappings::MAX_LISTED_RANGES),
        /// lowest first).
        ranges: Vec<super::mappings::RangeInfo>,
    },
}

impl SiteDetail {
    pub fn unit(&self) -> Unit {
        match self {
            SiteDetail::Mapping { .. } => Unit::Bytes,
            _ => Unit::Count,
        }
    }
}

/// A creating stack that holds resources at the end.
#[derive(Clone, Debug)]
pub struct ResourceSite {
    /// fds: `socket`, `file`, `pipe`... of its fds (`mixed` if they
    /// differ); `thread`; `anon_mapping` or `file_mapping`.
    pub kind: String,
    /// What every item of the site is, when they all agree: a socket's
    /// peer, a path, a thread's name, a mapped file.
    pub description: Option<String>,
    /// Items held at the end (fds open, threads alive or unjoined, mappings
    /// with bytes left: one unmapped in part counts once).
    pub outstanding: u64,
    /// Items this site created while traced.
    pub created: u64,
    /// Bytes held (mappings); null for fds and threads.
    pub bytes: Option<u64>,
    pub oldest_age_s: Option<f64>,
    pub median_age_s: Option<f64>,
    pub verdict: Verdict,
    /// Theil–Sen slope of its history, in its [`Unit`] per second (null
    /// with fewer than two samples).
    pub growth_per_s: Option<f64>,
    pub stack_captured: bool,
    pub stack_walk: &'static str,
    pub truncated: bool,
    pub frames: Frames,
    /// What the verdict was made of (in the site's unit).
    pub trend: Trend,
    pub history: Vec<HistoryPoint>,
    pub detail: SiteDetail,
    /// Its stack's key in the kernel's table (not in the JSON).
    pub stack_id: u64,
}

/// One sample of a resource site's history.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryPoint {
    pub t_s: f64,
    pub outstanding: i64,
    /// Bytes held (in the JSON for [`Unit::Bytes`] only).
    pub bytes: i64,
    pub oldest_age_s: Option<f64>,
}

impl Serialize for ResourceSite {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = &self.detail;
        let unit = d.unit();
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("kind", &self.kind)?;
        match d {
            SiteDetail::Fd { origin, .. } => m.serialize_entry("origin", origin)?,
            SiteDetail::Thread { .. } => m.serialize_entry("origin", "clone")?,
            SiteDetail::Mapping { shared, .. } => m.serialize_entry("shared", shared)?,
        }
        m.serialize_entry("description", &self.description)?;
        m.serialize_entry("outstanding", &self.outstanding)?;
        m.serialize_entry("created", &self.created)?;
        m.serialize_entry("bytes", &self.bytes)?;
        if let SiteDetail::Thread {
            alive,
            exited_unjoined,
            ..
        } = d
        {
            m.serialize_entry("alive", alive)?;
            m.serialize_entry("exited_unjoined", exited_unjoined)?;
        }
        m.serialize_entry("oldest_age_s", &self.oldest_age_s)?;
        m.serialize_entry("median_age_s", &self.median_age_s)?;
        m.serialize_entry("verdict", &self.verdict)?;
        m.serialize_entry("growth_per_s", &self.growth_per_s)?;
        m.serialize_entry("stack_captured", &self.stack_captured)?;
        m.serialize_entry("stack_walk", self.stack_walk)?;
        m.serialize_entry("truncated", &self.truncated)?;
        m.serialize_entry("frames", &FramesJson(&self.frames))?;
        m.serialize_entry("trend", &TrendJson(&self.trend, unit))?;
        let history: Vec<PointJson> = self.history.iter().map(|p| PointJson(p, unit)).collect();
        m.serialize_entry("history", &history)?;
        match d {
            SiteDetail::Fd { fds, .. } => m.serialize_entry("fds", fds)?,
            SiteDetail::Thread { threads, .. } => m.serialize_entry("threads", threads)?,
            SiteDetail::Mapping { ranges, .. } => m.serialize_entry("ranges", ranges)?,
        }
        m.end()
    }
}

struct FramesJson<'a>(&'a Frames);

impl Serialize for FramesJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

/// A trend in the site's unit: the heap's names in bytes, `*_per_s` and
/// `early_fds_retained` in counts (as the schema has them since fds).
struct TrendJson<'a>(&'a Trend, Unit);

impl Serialize for TrendJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (t, bytes) = (self.0, self.1 == Unit::Bytes);
        let mut m = s.serialize_map(Some(8))?;
        m.serialize_entry("samples", &t.samples)?;
        m.serialize_entry("span_s", &t.span_s)?;
        let (growth, recent, early) = if bytes {
            (
                "growth_bytes_per_s",
                "recent_growth_bytes_per_s",
                "early_blocks_retained",
            )
        } else {
            ("growth_per_s", "recent_growth_per_s", "early_fds_retained")
        };
        m.serialize_entry(growth, &t.growth_bytes_per_s)?;
        m.serialize_entry(recent, &t.recent_growth_bytes_per_s)?;
        m.serialize_entry("relative_growth", &t.relative_growth)?;
        m.serialize_entry("growth_share", &t.growth_share)?;
        m.serialize_entry(early, &t.early_blocks_retained)?;
        m.serialize_entry("max_oldest_age_s", &t.max_oldest_age_s)?;
        m.end()
    }
}

/// A history point in the site's unit: with `bytes` (and `oldest_age_s`
/// always) in bytes; in counts, `oldest_age_s` only when known.
struct PointJson<'a>(&'a HistoryPoint, Unit);

impl Serialize for PointJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("t_s", &p.t_s)?;
        m.serialize_entry("outstanding", &p.outstanding)?;
        if self.1 == Unit::Bytes {
            m.serialize_entry("bytes", &p.bytes)?;
            m.serialize_entry("oldest_age_s", &p.oldest_age_s)?;
        } else if let Some(a) = p.oldest_age_s {
            m.serialize_entry("oldest_age_s", &a)?;
        }
        m.end()
    }
}

impl VerdictCounts {
    /// How many of `sites` got each verdict.
    pub fn of_resources(sites: &[ResourceSite]) -> Self {
        let mut c = VerdictCounts::default();
        for s in sites {
            c.count(s.verdict);
        }
        c
    }
}

impl ResourceSite {
    /// `12 TCP sockets to 127.0.0.1:5432, ESTABLISHED`, `3 threads alive
    /// "worker"`, `1 shared file mapping of /tmp/x, 4.0 KiB`.
    pub fn headline(&self) -> String {
        match &self.detail {
            SiteDetail::Fd { .. } => self.fd_headline(),
            SiteDetail::Thread {
                alive,
                exited_unjoined,
                ..
            } => self.thread_headline(*alive, *exited_unjoined),
            SiteDetail::Mapping { shared, .. } => self.mapping_headline(*shared),
        }
    }

    fn fd_headline(&self) -> String {
        let n = self.outstanding;
        let plural = if n == 1 { "" } else { "s" };
        match self.description.as_deref() {
            Some(d) if self.kind == "socket" => {
                let (proto, rest) = d.split_once(' ').unwrap_or((d, ""));
                let rest = match rest.rsplit_once(' ') {
                    Some((peer, state)) if proto == "TCP" && !rest.starts_with("listening") => {
                        format!("to {}, {}", Escaped(peer), state)
                    }
                    _ => Escaped(rest).to_string(),
                };
                format!("{n} {proto} socket{plural} {rest}")
                    .trim_end()
                    .to_string()
            }
            Some(d) => format!("{n} {}{plural} {}", self.kind, Escaped(d)),
            None => format!("{n} {}{plural}", self.kind),
        }
    }

    fn thread_headline(&self, alive: u64, exited_unjoined: u64) -> String {
        let plural = |n: u64| if n == 1 { "thread" } else { "threads" };
        let mut parts = Vec::new();
        if alive > 0 {
            parts.push(format!("{alive} {} alive", plural(alive)));
        }
        if exited_unjoined > 0 {
            let n = exited_unjoined;
            parts.push(if parts.is_empty() {
                format!("{n} {} exited unjoined", plural(n))
            } else {
                format!("{n} exited unjoined")
            });
        }
        let mut s = parts.join(", ");
        if let Some(d) = &self.description {
            let _ = write!(s, " \"{}\"", Escaped(d));
        }
        s
    }

    fn mapping_headline(&self, shared: bool) -> String {
        let noun = match (self.kind.as_str(), shared) {
            ("file_mapping", false) => "private file mapping",
            ("file_mapping", true) => "shared file mapping",
            (_, false) => "anonymous mapping",
            (_, true) => "shared anonymous mapping",
        };
        let of = self
            .description
            .as_deref()
            .map(|d| format!(" of {}", Escaped(d)))
            .unwrap_or_default();
        format!(
            "{}{of}, {}",
            counted(self.outstanding, noun),
            format_bytes(self.bytes.unwrap_or(0) as i64)
        )
    }

    /// `+1.5/s` in its unit, when it grows.
    fn growth_text(&self) -> Option<String> {
        let g = self.growth_per_s.filter(|g| *g > 0.0)?;
        Some(match self.detail.unit() {
            Unit::Count => format!("+{g:.1}/s"),
            Unit::Bytes => format!("+{}/s", format_bytes(g as i64)),
        })
    }
}

/// The text report's top `sites` (of one resource, `noun` `fd`...) with
/// their stacks, read as the heap sites' are (report/stack_text.rs).
pub(super) fn write_sites(
    w: &mut String,
    sites: &[ResourceSite],
    noun: &str,
    exe: Option<&str>,
    style: &TextStyle,
) -> std::fmt::Result {
    let top = style.top;
    let paths = super::stack_text::ShortPaths::of(
        sites
            .iter()
            .take(top)
            .flat_map(|s| s.frames.iter())
            .flat_map(super::stack_text::frame_paths),
    );
    for s in sites.iter().take(top) {
        let growth = s
            .growth_text()
            .map(|g| format!(", {g}"))
            .unwrap_or_default();
        let oldest = s
            .oldest_age_s
            .map(|a| format!(", oldest {a:.1}s"))
            .unwrap_or_default();
        writeln!(
            w,
            "  {}, {} ({} created{growth}{oldest})",
            s.headline(),
            s.verdict.as_str().to_uppercase(),
            s.created
        )?;
        if !s.stack_captured {
            writeln!(w, "      [stack not captured]")?;
        }
        let frames: Vec<&super::Frame> = s.frames.iter().collect();
        for line in super::stack_text::creation_stack_lines(&frames, exe, &paths, style) {
            writeln!(w, "    {line}")?;
        }
    }
    if sites.len() > top {
        writeln!(w, "  ... {} more {noun} sites", sites.len() - top)?;
    }
    Ok(())
}

#[cfg(test)]
pub(super) fn test_site(
    kind: &str,
    description: Option<&str>,
    n: u64,
    detail: SiteDetail,
) -> ResourceSite {
    ResourceSite {
        kind: kind.to_string(),
        description: description.map(String::from),
        outstanding: n,
        created: n,
        bytes: (detail.unit() == Unit::Bytes).then_some(n << 22),
        oldest_age_s: None,
        median_age_s: None,
        verdict: Verdict::Leak,
        growth_per_s: None,
        stack_captured: true,
        stack_walk: "unwind-tables",
        truncated: false,
        frames: Frames::default(),
        trend: Trend::default(),
        history: Vec::new(),
        detail,
        stack_id: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(kind: &str, description: Option<&str>, n: u64) -> ResourceSite {
        let detail = SiteDetail::Fd {
            origin: "socket",
            fds: Vec::new(),
        };
        test_site(kind, description, n, detail)
    }

    fn thread(alive: u64, exited_unjoined: u64, name: Option<&str>) -> ResourceSite {
        let detail = SiteDetail::Thread {
            alive,
            exited_unjoined,
            threads: Vec::new(),
        };
        test_site("thread", name, alive + exited_unjoined, detail)
    }

    fn mapping(kind: &str, shared: bool, description: Option<&str>, n: u64) -> ResourceSite {
        let detail = SiteDetail::Mapping {
            shared,
            ranges: Vec::new(),
        };
        test_site(kind, description, n, detail)
    }

    #[test]
    fn fd_headlines_say_what_the_fds_are() {
        let tcp = fd("socket", Some("TCP 127.0.0.1:5432 ESTABLISHED"), 12);
        assert_eq!(
            tcp.headline(),
            "12 TCP sockets to 127.0.0.1:5432, ESTABLISHED"
        );
        let listen = fd("socket", Some("TCP listening on 0.0.0.0:80"), 1);
        assert_eq!(listen.headline(), "1 TCP socket listening on 0.0.0.0:80");
        let unix = fd("socket", Some("unix /run/a\x1b.sock"), 2);
        assert_eq!(unix.headline(), "2 unix sockets /run/a\\x1b.sock");
        assert_eq!(fd("pipe", None, 3).headline(), "3 pipes");
        assert_eq!(fd("file", Some("/tmp/x"), 1).headline(), "1 file /tmp/x");
    }

    #[test]
    fn thread_headlines_say_how_the_threads_are_held() {
        assert_eq!(
            thread(12, 0, Some("worker")).headline(),
            "12 threads alive \"worker\""
        );
        assert_eq!(thread(0, 1, None).headline(), "1 thread exited unjoined");
        assert_eq!(
            thread(1, 3, Some("a\x1b")).headline(),
            "1 thread alive, 3 exited unjoined \"a\\x1b\""
        );
    }

    #[test]
    fn mapping_headlines_say_what_is_mapped() {
        assert_eq!(
            mapping("anon_mapping", false, None, 3).headline(),
            "3 anonymous mappings, 12.0 MiB"
        );
        assert_eq!(
            mapping("file_mapping", true, Some("/tmp/a\x1b"), 1).headline(),
            "1 shared file mapping of /tmp/a\\x1b, 4.0 MiB"
        );
    }

    #[test]
    fn json_keeps_each_resources_fields_and_units() {
        let mut t = thread(2, 1, Some("w"));
        t.history.push(HistoryPoint {
            t_s: 1.0,
            outstanding: 3,
            bytes: 3,
            oldest_age_s: None,
        });
        let json = serde_json::to_string(&t).unwrap();
        assert!(
            json.starts_with(
                "{\"kind\":\"thread\",\"origin\":\"clone\",\"description\":\"w\",\
                 \"outstanding\":3,\"created\":3,\"bytes\":null,\"alive\":2,\
                 \"exited_unjoined\":1,\"oldest_age_s\":null,"
            ),
            "{json}"
        );
        assert!(json.contains("\"early_fds_retained\":null"), "{json}");
        assert!(
            json.ends_with("\"history\":[{\"t_s\":1.0,\"outstanding\":3}],\"threads\":[]}"),
            "{json}"
        );
        let mut m = mapping("anon_mapping", false, None, 1);
        m.history = t.history.clone();
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["shared"], false);
        assert!(v["trend"].get("growth_bytes_per_s").is_some());
        assert_eq!(
            v["history"][0],
            serde_json::json!({"t_s": 1.0, "outstanding": 3, "bytes": 3, "oldest_age_s": null})
        );
    }
}
