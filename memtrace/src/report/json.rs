//! The JSON form of a report (`memtrace-report/1`), written by one streamed
//! writer from its first byte to its last.
//!
//! The report's own objects (the report, its sites, their frames, trends and
//! histories) are written here by hand: ten thousand sites make tens of
//! megabytes and about half a million keys, all plain ASCII, which serde
//! would escape one by one; and the frames of an address that several sites
//! share are written once per report and copied after that. The smaller
//! objects that other stages define (`sampling`, `process`, `unwind`, ...)
//! are written by their serde derive, inside this writer.
//!
//! The bytes are those serde_json's compact writer made of the report's derive
//! before this writer replaced it (non-finite floats as `null`, numbers and
//! strings formatted by serde_json): `expected/*.json` pins them. Each writer
//! below destructures what it writes without `..`, so a field added to the
//! model does not compile until it is written or skipped here.
use std::io::{self, Write};

use rustc_hash::FxHashMap;
use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter as _};

use super::{Frames, HistoryPoint, Report, Site};
use crate::{analyze::Trend, symbolize::Frame};

/// The bytes before an object's value: `{"key":` for its first key,
/// `,"key":` for the others. Keys are literals: plain ASCII, never escaped.
macro_rules! key {
    (first $k:literal) => {
        concat!("{\"", $k, "\":").as_bytes()
    };
    ($k:literal) => {
        concat!(",\"", $k, "\":").as_bytes()
    };
}

/// A key (from [`key!`]) and its value, as serde_json writes the value.
/// Inline: a report of ten thousand sites makes about a million of these
/// calls, which showed in profiles when they were left out of line.
trait Fields: Write {
    #[inline]
    fn put_u64(&mut self, key: &[u8], v: u64) -> io::Result<()> {
        self.write_all(key)?;
        CompactFormatter.write_u64(self, v)
    }

    #[inline]
    fn put_opt_u64(&mut self, key: &[u8], v: Option<u64>) -> io::Result<()> {
        match v {
            Some(v) => self.put_u64(key, v),
            None => {
                self.write_all(key)?;
                self.write_all(b"null")
            }
        }
    }

    #[inline]
    fn put_i64(&mut self, key: &[u8], v: i64) -> io::Result<()> {
        self.write_all(key)?;
        CompactFormatter.write_i64(self, v)
    }

    #[inline]
    fn put_bool(&mut self, key: &[u8], v: bool) -> io::Result<()> {
        self.write_all(key)?;
        CompactFormatter.write_bool(self, v)
    }

    /// serde_json writes non-finite floats as `null`.
    #[inline]
    fn put_f64(&mut self, key: &[u8], v: f64) -> io::Result<()> {
        self.put_opt_f64(key, Some(v))
    }

    #[inline]
    fn put_opt_f64(&mut self, key: &[u8], v: Option<f64>) -> io::Result<()> {
        self.write_all(key)?;
        match v {
            Some(v) if v.is_finite() => CompactFormatter.write_f64(self, v),
            _ => self.write_all(b"null"),
        }
    }

    #[inline]
    fn put_str(&mut self, key: &[u8], v: &str) -> io::Result<()> {
        self.put(key, v)
    }

    #[inline]
    fn put_opt_str(&mut self, key: &[u8], v: Option<&str>) -> io::Result<()> {
        match v {
            Some(v) => self.put_str(key, v),
            None => {
                self.write_all(key)?;
                self.write_all(b"null")
            }
        }
    }

    /// A value through its serde derive.
    #[inline]
    fn put<T: Serialize + ?Sized>(&mut self, key: &[u8], v: &T) -> io::Result<()> {
        self.write_all(key)?;
        Ok(serde_json::to_writer(&mut *self, v)?)
    }
}

impl<W: Write + ?Sized> Fields for W {}

impl Report {
    /// The JSON form, written to `w` as it is made.
    pub fn write_json(&self, w: impl Write) -> io::Result<()> {
        // A buffer of a concrete type here: the report is written in millions
        // of small pieces, and the caller's writer is `dyn Write`, whose every
        // call is an indirect one.
        let mut out = ReportWriter {
            w: io::BufWriter::with_capacity(256 * 1024, w),
            frames: FxHashMap::default(),
        };
        out.report(self)?;
        out.w.write_all(b"\n")?;
        out.w.flush()
    }

    #[cfg(test)]
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        self.write_json(&mut out)
            .expect("a report always serializes");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }
}

struct ReportWriter<W> {
    w: W,
    /// The JSON of one address's frames (comma-separated), by the address of
    /// the shared slice, made once per report: the report holds the slices
    /// while the writer lives, so no address is reused.
    frames: FxHashMap<usize, Vec<u8>>,
}

impl<W: Write> ReportWriter<W> {
    fn report(&mut self, r: &Report) -> io::Result<()> {
        let Report {
            schema,
            memtrace_version,
            target,
            started_at,
            ended_at,
            duration_s,
            end_reason,
            sampling,
            totals,
            drops,
            untraced_entry_points,
            allocator,
            min_age_s,
            ages_from,
            verdict_config,
            timeline,
            verdicts,
            process,
            unwind,
            attach,
            attached: _,
            // Not in the JSON: exports that name mappings (pprof) use them.
            modules: _,
            sites,
            freed_sites,
            freed_sites_left_out,
            cut_short,
            snapshots,
            resources,
            lineage,
        } = r;
        let w = &mut self.w;
        w.put_str(key!(first "schema"), schema)?;
        w.put_str(key!("memtrace_version"), memtrace_version)?;
        w.put(key!("target"), target)?;
        w.put_str(key!("started_at"), started_at)?;
        w.put_str(key!("ended_at"), ended_at)?;
        w.put_f64(key!("duration_s"), *duration_s)?;
        w.put_str(key!("end_reason"), end_reason)?;
        w.put(key!("sampling"), sampling)?;
        w.put(key!("totals"), totals)?;
        w.put(key!("drops"), drops)?;
        w.put(key!("untraced_entry_points"), untraced_entry_points)?;
        w.put(key!("allocator"), allocator)?;
        w.put_f64(key!("min_age_s"), *min_age_s)?;
        w.put_str(key!("ages_from"), ages_from)?;
        w.put(key!("verdict_config"), verdict_config)?;
        w.put(key!("timeline"), timeline)?;
        w.put(key!("verdicts"), verdicts)?;
        w.put(key!("process"), process)?;
        w.put(key!("unwind"), unwind)?;
        w.put(key!("attach"), attach)?;
        w.write_all(key!("sites"))?;
        self.sites(sites, false)?;
        self.w.write_all(key!("freed_sites"))?;
        self.sites(freed_sites, true)?;
        self.w
            .put(key!("freed_sites_left_out"), freed_sites_left_out)?;
        self.w.put(key!("cut_short"), cut_short)?;
        if let Some(s) = snapshots {
            self.w.put(key!("snapshots"), s)?;
        }
        self.w.put(key!("resources"), resources)?;
        if let Some(l) = lineage {
            self.w.put(key!("images"), &l.images)?;
            self.w
                .put(key!("forks_not_followed"), &l.forks_not_followed)?;
            if let Some(p) = &l.processes {
                self.w.put(key!("processes"), p)?;
            }
        }
        self.w.write_all(b"}")
    }

    /// A list of sites; `freed`: of `freed_sites`, whose entries also say how
    /// many of their blocks were freed.
    fn sites(&mut self, sites: &[Site], freed: bool) -> io::Result<()> {
        self.w.write_all(b"[")?;
        for (i, site) in sites.iter().enumerate() {
            if i > 0 {
                self.w.write_all(b",")?;
            }
            self.site(site, freed)?;
        }
        self.w.write_all(b"]")
    }

    fn site(&mut self, s: &Site, freed: bool) -> io::Result<()> {
        let Site {
            outstanding_blocks,
            outstanding_bytes,
            peak_bytes,
            alloc_calls,
            alloc_bytes,
            dropped_blocks,
            oldest_age_s,
            median_age_s,
            verdict,
            growth_bytes_per_s,
            stack_captured,
            stack_walk,
            truncated,
            truncated_reason,
            native_frames_folded,
            frames,
            trend,
            history,
        } = s;
        let w = &mut self.w;
        let id = super::site_id::site_id(stack_captured.then_some(frames));
        w.put_str(key!(first "site_id"), &id)?;
        w.put_u64(key!("outstanding_blocks"), *outstanding_blocks)?;
        w.put_u64(key!("outstanding_bytes"), *outstanding_bytes)?;
        w.put_u64(key!("peak_bytes"), *peak_bytes)?;
        w.put_u64(key!("alloc_calls"), *alloc_calls)?;
        w.put_u64(key!("alloc_bytes"), *alloc_bytes)?;
        if *dropped_blocks > 0 {
            w.put_u64(key!("dropped_blocks"), *dropped_blocks)?;
        }
        if freed {
            // Blocks dropped from a full table were neither held nor seen freed.
            let freed_blocks = alloc_calls
                .saturating_sub(*outstanding_blocks)
                .saturating_sub(*dropped_blocks);
            w.put_u64(key!("freed_blocks"), freed_blocks)?;
        }
        w.put_opt_f64(key!("oldest_age_s"), *oldest_age_s)?;
        if let Some(m) = *median_age_s {
            w.put_f64(key!("median_age_s"), m)?;
        }
        w.put(key!("verdict"), verdict)?;
        w.put_opt_f64(key!("growth_bytes_per_s"), *growth_bytes_per_s)?;
        w.put_bool(key!("stack_captured"), *stack_captured)?;
        w.put_str(key!("stack_walk"), stack_walk)?;
        w.put_bool(key!("truncated"), *truncated)?;
        if let Some(r) = truncated_reason {
            w.put_str(key!("truncated_reason"), r)?;
        }
        if let Some(folded) = native_frames_folded {
            w.put_bool(key!("native_frames_folded"), *folded)?;
        }
        w.write_all(key!("frames"))?;
        self.frames(frames)?;
        self.w.write_all(key!("trend"))?;
        trend_json(&mut self.w, trend)?;
        self.w.write_all(key!("history"))?;
        history_json(&mut self.w, history)?;
        self.w.write_all(b"}")
    }

    /// A site's frames as a JSON array. A group of frames that other sites
    /// hold too is made once, then copied.
    fn frames(&mut self, frames: &Frames) -> io::Result<()> {
        let w = &mut self.w;
        w.write_all(b"[")?;
        let mut first = true;
        for g in frames.groups().iter().filter(|g| !g.is_empty()) {
            if !first {
                w.write_all(b",")?;
            }
            first = false;
            // A group of one site only is written once anyway: as it is.
            if std::sync::Arc::strong_count(g) == 1 {
                group_json(w, g)?;
                continue;
            }
            let raw = match self.frames.entry(g.as_ptr() as usize) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let mut raw = Vec::new();
                    group_json(&mut raw, g)?;
                    e.insert(raw)
                }
            };
            w.write_all(raw)?;
        }
        w.write_all(b"]")
    }
}

/// One address's frames, comma-separated (no brackets).
fn group_json<W: Write + ?Sized>(w: &mut W, frames: &[Frame]) -> io::Result<()> {
    for (i, f) in frames.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        frame_json(w, f)?;
    }
    Ok(())
}

fn frame_json<W: Write + ?Sized>(w: &mut W, f: &Frame) -> io::Result<()> {
    let Frame {
        address,
        module,
        function,
        file,
        line,
        inlined,
        kind,
        unresolved: _,
    } = f;
    // Hex digits: nothing to escape.
    let mut buf = [0u8; 18];
    w.write_all(key!(first "address"))?;
    w.write_all(b"\"")?;
    w.write_all(crate::symbolize::hex_str(*address, &mut buf).as_bytes())?;
    w.write_all(b"\"")?;
    w.put_opt_str(key!("module"), module.as_deref())?;
    w.put_opt_str(key!("function"), function.as_deref())?;
    w.put_opt_str(key!("file"), file.as_deref())?;
    w.put_opt_u64(key!("line"), line.map(u64::from))?;
    w.put_bool(key!("inlined"), *inlined)?;
    w.put_str(key!("kind"), kind.name())?;
    w.write_all(b"}")
}

fn trend_json<W: Write + ?Sized>(w: &mut W, t: &Trend) -> io::Result<()> {
    let Trend {
        samples,
        span_s,
        growth_bytes_per_s,
        recent_growth_bytes_per_s,
        relative_growth,
        growth_share,
        early_blocks_retained,
        max_oldest_age_s,
    } = t;
    w.put_u64(key!(first "samples"), *samples as u64)?;
    w.put_f64(key!("span_s"), *span_s)?;
    w.put_opt_f64(key!("growth_bytes_per_s"), *growth_bytes_per_s)?;
    w.put_opt_f64(
        key!("recent_growth_bytes_per_s"),
        *recent_growth_bytes_per_s,
    )?;
    w.put_opt_f64(key!("relative_growth"), *relative_growth)?;
    w.put_opt_f64(key!("growth_share"), *growth_share)?;
    w.put_opt_f64(key!("early_blocks_retained"), *early_blocks_retained)?;
    w.put_opt_f64(key!("max_oldest_age_s"), *max_oldest_age_s)?;
    w.write_all(b"}")
}

fn history_json<W: Write + ?Sized>(w: &mut W, history: &[HistoryPoint]) -> io::Result<()> {
    w.write_all(b"[")?;
    for (i, p) in history.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        let HistoryPoint {
            t_s,
            outstanding_bytes,
            outstanding_blocks,
            oldest_age_s,
            median_age_s,
        } = p;
        w.put_f64(key!(first "t_s"), *t_s)?;
        w.put_i64(key!("outstanding_bytes"), *outstanding_bytes)?;
        w.put_i64(key!("outstanding_blocks"), *outstanding_blocks)?;
        if let Some(a) = *oldest_age_s {
            w.put_f64(key!("oldest_age_s"), a)?;
        }
        if let Some(a) = *median_age_s {
            w.put_f64(key!("median_age_s"), a)?;
        }
        w.write_all(b"}")?;
    }
    w.write_all(b"]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analyze::Verdict,
        report::{
            Sampling,
            fixture::{self, frame, sample, with_verdicts},
        },
    };

    /// `r` with a copy of each group of frames of its own for each site: none
    /// shared, so that none is written from the cache.
    fn unshared(r: &Report) -> Report {
        let mut r = r.clone();
        for s in &mut r.sites {
            let groups = s
                .frames
                .groups()
                .iter()
                .map(|g| g.to_vec().into())
                .collect();
            s.frames = Frames(groups);
        }
        r
    }

    /// Reports with every kind of value the schema holds, written as
    /// serde_json wrote them from the report's derive before this writer
    /// replaced it (`expected/` holds what it wrote), with and without the
    /// cache of shared frames.
    #[test]
    fn reports_are_written_byte_for_byte_as_before() {
        let exact = include_str!("expected/report-exact.json");
        let sampled = include_str!("expected/report-sampled.json");
        for (sampling, want) in [
            (Sampling::Exact, exact),
            (Sampling::from_mean(512 * 1024), sampled),
        ] {
            let r = fixture::varied(sampling);
            assert_eq!(r.to_json(), want);
            assert_eq!(unshared(&r).to_json(), want);
        }
    }

    #[test]
    fn freed_sites_say_what_was_freed_and_what_was_left_out() {
        let v: serde_json::Value =
            serde_json::from_str(&fixture::varied(Sampling::Exact).to_json()).unwrap();
        let freed = &v["freed_sites"];
        assert_eq!(freed[0]["alloc_calls"], 500);
        assert_eq!(freed[0]["freed_blocks"], 500);
        assert_eq!(freed[0]["outstanding_blocks"], 0);
        assert_eq!(freed[0]["frames"][0]["function"], "leaky");
        // Blocks younger than --min-age: outstanding, not freed.
        assert_eq!(freed[1]["freed_blocks"], 37);
        assert_eq!(freed[1]["outstanding_blocks"], 3);
        assert!(v["sites"][0].get("freed_blocks").is_none());
        assert_eq!(
            v["freed_sites_left_out"],
            serde_json::json!({"sites": 2, "alloc_calls": 30, "alloc_bytes": 4000})
        );
        assert_eq!(
            v["cut_short"][0],
            "module capture: /mnt/\"slow\"\n.so did not answer in 2s"
        );
    }

    #[test]
    fn the_frame_cache_changes_no_byte() {
        let r = fixture::at_scale(300);
        assert_eq!(r.to_json(), unshared(&r).to_json());
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
    fn sites_are_written_as_serde_writes_them() {
        let mut r = sample();
        let mut odd = r.sites[0].clone();
        odd.median_age_s = Some(f64::NAN);
        odd.oldest_age_s = None;
        odd.growth_bytes_per_s = Some(f64::INFINITY);
        odd.truncated = true;
        odd.truncated_reason = Some("depth limit of 127 frames");
        odd.stack_walk = "frame-pointers";
        odd.verdict = Verdict::Leak;
        odd.trend = Trend {
            samples: 3,
            span_s: 1.5e-7,
            growth_bytes_per_s: Some(-12.25),
            recent_growth_bytes_per_s: None,
            relative_growth: Some(f64::NEG_INFINITY),
            growth_share: Some(1.0),
            early_blocks_retained: None,
            max_oldest_age_s: Some(123456789.125),
        };
        odd.history = vec![
            HistoryPoint {
                t_s: 0.25,
                outstanding_bytes: -5,
                outstanding_blocks: i64::MAX,
                oldest_age_s: None,
                median_age_s: Some(0.1),
            },
            HistoryPoint {
                t_s: 1e21,
                outstanding_bytes: 0,
                outstanding_blocks: i64::MIN,
                oldest_age_s: Some(2.0),
                median_age_s: None,
            },
        ];
        let mut empty = odd.clone();
        empty.history.clear();
        empty.frames = Frames::default();
        empty.outstanding_blocks = u64::MAX;
        r.sites.push(odd);
        r.sites.push(empty);
        // As serde_json wrote them from the report's derive (and no cache),
        // before this writer replaced it.
        assert_eq!(r.to_json(), include_str!("expected/odd-sites.json"));
        r.sites.clear();
        assert_eq!(r.to_json(), include_str!("expected/no-sites.json"));
    }

    #[test]
    fn shared_frames_are_written_as_without_the_cache() {
        let mut r = sample();
        let mut other = r.sites[0].clone();
        other.outstanding_bytes += 1;
        // Site 0's group of two frames shared by two more sites, after a leaf
        // of their own, then a frame that differs from one of the shared ones
        // only in its line, and one with characters JSON escapes.
        let shared = r.sites[0].frames.0[0].clone();
        let mut near = shared[1].clone();
        near.line = near.line.map(|l| l + 1);
        let mut frames = Frames::default();
        frames.push_group(vec![frame(0x400000, "other_leaf", 3)].into());
        frames.push_group(shared);
        frames.push_group(vec![near].into());
        frames.push_group(
            vec![Frame {
                address: u64::MAX,
                module: Some("/lib/\"quoted\"\n.so".into()),
                function: None,
                file: None,
                line: None,
                inlined: false,
                kind: crate::symbolize::FrameKind::Native,
                unresolved: None,
            }]
            .into(),
        );
        other.frames = frames;
        r.sites.push(other.clone());
        r.sites.push(other);
        // The same report with no group shared does not go through the cache.
        let plain = unshared(&r).to_json();
        let written: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(
            written,
            serde_json::from_str::<serde_json::Value>(&plain).unwrap()
        );
        // Byte for byte, too, and as serde_json wrote it from the derive.
        assert_eq!(r.to_json(), plain);
        assert_eq!(r.to_json(), include_str!("expected/shared-frames.json"));
        let frames = &written["sites"][1]["frames"];
        assert_eq!(frames[0]["function"], "other_leaf");
        assert_eq!(frames[1]["function"], "helper");
        assert_eq!(frames[2]["line"], 38);
        assert_eq!(frames[3]["line"], 39);
        assert_eq!(frames[4]["address"], "0xffffffffffffffff");
        assert_eq!(frames[4]["module"], "/lib/\"quoted\"\n.so");
        assert_eq!(frames, &written["sites"][2]["frames"]);
        assert_eq!(written["sites"][0]["frames"][0]["address"], "0x401136");
    }

    #[test]
    fn json_has_verdicts_history_and_process() {
        let r = with_verdicts();
        assert_eq!(r.to_json(), include_str!("expected/with-verdicts.json"));
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        // Sites stay sorted by outstanding bytes in JSON.
        assert_eq!(v["sites"][0]["verdict"], "stable");
        let leak = &v["sites"][1];
        assert_eq!(leak["verdict"], "leak");
        assert_eq!(leak["growth_bytes_per_s"], 2048.0);
        assert_eq!(leak["median_age_s"], 2.0);
        assert_eq!(leak["trend"]["early_blocks_retained"], 1.0);
        assert_eq!(
            leak["history"][0],
            serde_json::json!({"t_s": 0.2, "outstanding_bytes": 100, "outstanding_blocks": 1,
                               "oldest_age_s": 0.1, "median_age_s": 0.1})
        );
        assert_eq!(
            leak["history"][1],
            serde_json::json!({"t_s": 4.2, "outstanding_bytes": 300, "outstanding_blocks": 3})
        );
        assert!(v["sites"][0].get("median_age_s").is_none());
        assert_eq!(v["verdicts"]["leak"], 1);
        assert_eq!(v["verdict_config"]["min_samples"], 4);
        assert_eq!(v["timeline"]["samples"], 21);
        assert_eq!(v["process"]["samples"][0]["rss_bytes"], 10 << 20);
        assert_eq!(v["process"]["samples"][0]["traced_bytes"], 1000);
        assert_eq!(v["process"]["summary"]["last"]["threads"], 2);
        assert!(v.get("attached").is_none());
    }
}
