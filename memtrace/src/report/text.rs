//! The text form of a report: a header, the totals, how the stacks and ages
//! were got, the process, the verdicts, then the top sites, leaks first.
use crate::escape::{Escaped, untraced_entry};
use std::fmt::Write as _;

use super::stack_text::{self, GROWING, LEAK, ShortPaths, TextStyle, frame_paths, stack_lines};
use super::{Drops, Report, Sampling, Site};
use crate::symbolize::{Frame, FrameKind};
use crate::{
    analyze::{Verdict, VerdictConfig},
    units::{counted, format_bytes, format_count, format_duration, format_rate},
};

fn secs(s: f64) -> String {
    format_duration(std::time::Duration::from_secs_f64(s.max(0.0)))
}

fn percent(share: f64) -> String {
    let p = share * 100.0;
    if p > 0.0 && p < 1.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

fn signed_rate(bytes_per_s: f64) -> String {
    let r = format_rate(bytes_per_s, std::time::Duration::from_secs(1));
    if bytes_per_s >= 0.0 {
        format!("+{r}")
    } else {
        r
    }
}

impl Drops {
    fn nonzero(&self) -> Vec<(&'static str, u64)> {
        [
            (
                "allocation map full: raise --max-blocks",
                self.alloc_map_full,
            ),
            ("in-flight map full", self.pending_map_full),
            ("site map full: raise --max-blocks", self.site_map_full),
            (
                "posix_memalign result unreadable",
                self.out_pointer_read_errors,
            ),
            ("return without entry", self.unmatched_returns),
            ("return never seen", self.missed_returns),
            ("stack unreadable", self.stack_read_errors),
            ("stack map full: raise --max-stacks", self.stack_map_full),
            ("stack hash collision", self.stack_hash_collisions),
            (
                "allocator call that should not have returned",
                self.unforeseen_returns,
            ),
            (
                "call maybe the allocator's own (return probe's trampoline not resolved)",
                self.own_call_uretprobe_unresolved,
            ),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

impl Site {
    /// The line under the site's header that says what its history shows.
    pub fn verdict_text(&self, cfg: &VerdictConfig) -> String {
        let t = &self.trend;
        let rate = self.growth_bytes_per_s.map(signed_rate).unwrap_or_default();
        let over = format!("over {} ({} samples)", secs(t.span_s), t.samples);
        let held = t
            .early_blocks_retained
            .map(|r| format!("{} of its early blocks still held", percent(r)))
            .unwrap_or_else(|| "no early blocks to judge".into());
        match self.verdict {
            Verdict::Leak => format!("LEAK: {rate} {over}, {held}"),
            Verdict::Growing => {
                format!("growing: {rate} {over}, but it frees old blocks ({held})")
            }
            Verdict::Stable => format!("stable: {rate} {over}"),
            Verdict::Transient => format!(
                "transient: no block older than {}{}",
                secs(t.max_oldest_age_s.unwrap_or(0.0)),
                if rate.is_empty() {
                    String::new()
                } else {
                    format!(", {rate} {over}")
                }
            ),
            Verdict::Unknown if self.dropped_blocks > 0 => format!(
                "unknown: {} of its allocations were not recorded (the block table was full: \
                 raise --max-blocks), so what it holds does not tell whether it grows{}",
                format_count(self.dropped_blocks),
                if rate.is_empty() {
                    String::new()
                } else {
                    format!(" (recorded ones: {rate} {over})")
                }
            ),
            Verdict::Unknown => format!(
                "unknown: {} sample{}, a verdict needs {}{}",
                t.samples,
                if t.samples == 1 { "" } else { "s" },
                cfg.min_samples,
                if rate.is_empty() {
                    String::new()
                } else {
                    format!(" ({rate} so far)")
                }
            ),
        }
    }
}

/// The order of the text report: leaks, then growing sites, then the rest,
/// each by outstanding bytes (the order of `sites`). Indices into `sites`.
pub fn text_order(sites: &[Site]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sites.len()).collect();
    order.sort_by_key(|&i| text_rank(sites[i].verdict));
    order
}

fn text_rank(v: Verdict) -> u8 {
    match v {
        Verdict::Leak => 0,
        Verdict::Growing => 1,
        _ => 2,
    }
}

impl Report {
    /// The text form, with the `top` sites (leaks first), plain.
    #[cfg(test)]
    pub fn to_text(&self, top: usize) -> String {
        self.to_text_styled(&TextStyle::top(top))
    }

    /// The text form, with `style.top` sites (leaks first).
    pub fn to_text_styled(&self, style: &TextStyle) -> String {
        let mut o = String::new();
        self.header_text(&mut o);
        self.totals_text(&mut o);
        self.stacks_text(&mut o);
        self.ages_text(&mut o);
        self.process_text(&mut o);
        self.verdicts_text(&mut o, style);
        self.sites_text(&mut o, style);
        let processes = self.lineage.iter().flat_map(|l| &l.processes);
        for line in processes.flat_map(|p| p.text_lines(style.top)) {
            let _ = writeln!(o, "{line}");
        }
        self.freed_text(&mut o);
        if let Some(r) = &self.resources {
            let _ = super::resources::write_text(&mut o, &r.fds, self.target.exe.as_deref(), style);
            if let Some(t) = &r.threads {
                let _ = super::threads::write_text(&mut o, t, self.target.exe.as_deref(), style);
            }
            if let Some(m) = &r.mappings {
                let _ = super::mappings::write_text(&mut o, m, self.target.exe.as_deref(), style);
            }
        }
        o
    }

    /// What the sites that hold no old block allocated (listed in the JSON).
    fn freed_text(&self, o: &mut String) {
        let left = &self.freed_sites_left_out;
        let n = self.freed_sites.len() as u64 + left.sites;
        if n == 0 {
            return;
        }
        let calls: u64 =
            self.freed_sites.iter().map(|s| s.alloc_calls).sum::<u64>() + left.alloc_calls;
        let bytes: u64 =
            self.freed_sites.iter().map(|s| s.alloc_bytes).sum::<u64>() + left.alloc_bytes;
        let _ = writeln!(
            o,
            "\n{} other site{} allocated {}{} blocks ({}{}) while traced and {} no block{} \
             (in --format json: freed_sites)",
            format_count(n),
            if n == 1 { "" } else { "s" },
            self.est(),
            format_count(calls),
            self.est(),
            format_bytes(bytes as i64),
            if n == 1 { "holds" } else { "hold" },
            if self.min_age_s > 0.0 {
                " older than --min-age"
            } else {
                ""
            },
        );
    }

    /// The mark of an estimate: with sampling every byte and block figure is one.
    fn est(&self) -> &'static str {
        if self.sampling.is_sampled() { "~" } else { "" }
    }

    /// What was traced, for how long, how it ended, and how it was sampled.
    fn header_text(&self, o: &mut String) {
        let t = &self.target;
        let exe = Escaped(t.exe.as_deref().unwrap_or("?"));
        let ns_pid = match t.namespaces.other_pid(t.pid) {
            Some(p) => format!(" ({p} in its pid namespace)"),
            None => String::new(),
        };
        let _ = write!(
            o,
            "memtrace report: pid {}{ns_pid} ({exe}), traced for {}",
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
        if let Sampling::Bytes { mean_bytes } = self.sampling {
            let _ = writeln!(
                o,
                "sampled: one allocation per {} allocated on average (--sample-bytes); \
                 figures marked ~ are estimates",
                format_bytes(mean_bytes as i64)
            );
        }
        let ns = &t.namespaces;
        if ns.is_isolated() {
            let mut parts = Vec::new();
            if !ns.own_namespaces.is_empty() {
                let kinds = ns.own_namespaces.join(", ");
                let s = if ns.own_namespaces.len() > 1 { "s" } else { "" };
                parts.push(format!("own {kinds} namespace{s}"));
            }
            if ns.own_root {
                parts.push("own root directory".to_string());
            }
            let _ = writeln!(o, "isolated: {}", parts.join("; "));
        }
    }

    /// What is outstanding, from how many calls, and what was dropped.
    fn totals_text(&self, o: &mut String) {
        let est = self.est();
        let tot = &self.totals;
        let _ = writeln!(
            o,
            "outstanding: {est}{} in {est}{}, from {} ({est}{}) and {} while traced",
            format_bytes(tot.outstanding_bytes as i64),
            counted(tot.outstanding_blocks, "block"),
            counted(tot.alloc_calls, "allocation"),
            format_bytes(tot.alloc_bytes as i64),
            counted(tot.free_calls, "free"),
        );
        if tot.free_unknown > 0 {
            let _ = writeln!(
                o,
                "{} frees were of blocks memtrace did not see allocated{}",
                format_count(tot.free_unknown),
                match (self.attached, tot.dropped_events > 0) {
                    (true, false) => " (allocated before it attached)",
                    (true, true) => " (allocated before it attached, or dropped)",
                    (false, true) => " (dropped)",
                    (false, false) => "",
                }
            );
        }
        let drops = self.drops.nonzero();
        let blind = &self.untraced_entry_points;
        if !blind.is_empty() {
            let names: Vec<String> = blind
                .iter()
                .map(|u| untraced_entry(&u.name, &u.module, u.reason.as_deref()))
                .collect();
            let _ = writeln!(
                o,
                "NOT COMPLETE: the target may call {} allocator functions memtrace does not \
                 trace, whose blocks it does not see: {}",
                blind.len(),
                names.join(", ")
            );
        }
        if drops.is_empty() {
            if blind.is_empty() {
                let _ = writeln!(
                    o,
                    "nothing dropped: every allocator call was recorded with its stack"
                );
            }
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
        for what in &self.cut_short {
            let _ = writeln!(o, "CUT SHORT: {}", Escaped(what));
        }
        for line in self.lineage.iter().flat_map(|l| l.text_lines()) {
            let _ = writeln!(o, "{line}");
        }
        if let Some(s) = &self.snapshots {
            let _ = write!(
                o,
                "snapshots: {} written to {} (the newest {} kept)",
                s.written,
                Escaped(&s.dir),
                s.keep
            );
            if s.failed > 0 {
                let _ = write!(
                    o,
                    "; {} FAILED (the first error was said on stderr)",
                    s.failed
                );
            }
            if s.skipped > 0 {
                let _ = write!(
                    o,
                    "; {} skipped while the one before was still being written",
                    s.skipped
                );
            }
            o.push('\n');
        }
    }

    /// How the stacks were walked, and how many came out incomplete.
    fn stacks_text(&self, o: &mut String) {
        let u = &self.unwind;
        if u.modules > 0 {
            let _ = writeln!(
                o,
                "stacks: unwound with the .eh_frame tables of {} modules ({} of kernel memory)",
                u.modules,
                format_bytes((u.row_bytes + u.pages * 32) as i64)
            );
        } else {
            let _ = writeln!(
                o,
                "stacks: walked with frame pointers (no unwind tables loaded)"
            );
        }
        let truncated: Vec<&Site> = self.sites.iter().filter(|s| s.truncated).collect();
        if !truncated.is_empty() {
            let d = &self.drops;
            let causes: Vec<String> = [
                ("unreadable stack", d.unwind_bad_read),
                ("depth limit", d.unwind_depth_limit),
                ("unsupported unwind rule", d.unwind_unsupported),
                ("no row and no frame pointer", d.unwind_no_frame_pointer),
                (
                    "return probe's trampoline not resolved",
                    d.unwind_uretprobe_unresolved,
                ),
            ]
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| format!("{n} {what}"))
            .collect();
            let _ = writeln!(
                o,
                "{} of {} sites have truncated stacks (walks stopped early: {})",
                truncated.len(),
                self.sites.len(),
                causes.join(", ")
            );
        }
    }

    /// Where the ages came from, when not from every block.
    fn ages_text(&self, o: &mut String) {
        if self.ages_from == "epochs" || self.timeline.samples_with_epoch_ages > 0 {
            let _ = writeln!(
                o,
                "ages: {} from per-interval aggregates (too many blocks to read each one): \
                 resolved to the sampling interval",
                if self.ages_from == "epochs" {
                    "the report's and the history's".to_string()
                } else {
                    format!("{} history samples'", self.timeline.samples_with_epoch_ages)
                },
            );
        }
    }

    /// The process view: its memory at the last sample, its trend, and how much
    /// of it the traced heap explains.
    fn process_text(&self, o: &mut String) {
        let p = &self.process.summary;
        let Some(last) = &p.last else {
            return;
        };
        let mut line = format!(
            "process: rss {} (anonymous {}), vm {}",
            format_bytes(last.rss_bytes as i64),
            format_bytes(last.rss_anon_bytes as i64),
            format_bytes(last.vm_size_bytes as i64),
        );
        if let Some(h) = last.heap_bytes {
            let _ = write!(line, ", heap {}", format_bytes(h as i64));
        }
        if let Some(s) = last.swap_bytes.filter(|&s| s > 0) {
            let _ = write!(line, ", swap {}", format_bytes(s as i64));
        }
        if let Some(f) = last.fds {
            let _ = write!(line, ", {} fds", format_count(f));
        }
        let _ = write!(
            line,
            ", {} thread{}",
            last.threads,
            if last.threads == 1 { "" } else { "s" }
        );
        if let Some(t) = self.process.samples.last().map(|s| s.t_s)
            && self.target.exited
        {
            let _ = write!(line, " (last sampled at {})", secs(t));
        }
        let _ = writeln!(o, "{line}");
        let mut line = String::new();
        if let (Some(r), Some(h)) = (p.rss_growth_bytes_per_s, p.traced_growth_bytes_per_s)
            && p.samples >= 2
        {
            let _ = write!(
                line,
                "  over {} samples: rss {}, traced heap {}",
                p.samples,
                signed_rate(r),
                signed_rate(h)
            );
        }
        if let Some(share) = p.traced_share_of_rss {
            let _ = write!(
                line,
                "{}the traced heap is {} of rss",
                if line.is_empty() { "  " } else { "; " },
                percent(share)
            );
            if let Some(a) = p.traced_share_of_anon_rss {
                let _ = write!(line, " ({} of anonymous rss)", percent(a));
            }
            if self.attached {
                line.push_str(", blocks allocated before memtrace attached are not traced");
            }
        }
        if !line.is_empty() {
            let _ = writeln!(o, "{line}");
        }
        if let Some(note) = &p.note {
            let _ = writeln!(o, "  NOTE: {note}");
        }
    }

    /// How many sites got each verdict, leaks first.
    fn verdicts_text(&self, o: &mut String, style: &TextStyle) {
        let c = &self.verdicts;
        if self.sites.is_empty() {
            return;
        }
        let every = secs(self.timeline.interval_s * self.timeline.stride_intervals as f64);
        if c.unknown == self.sites.len() as u64 {
            let _ = writeln!(
                o,
                "verdicts: unknown for every site: {} sample{} (every {every}), a verdict needs {}: \
                 trace longer or use a shorter --interval",
                self.timeline.samples,
                if self.timeline.samples == 1 { "" } else { "s" },
                self.verdict_config.min_samples
            );
            return;
        }
        let _ = writeln!(
            o,
            "verdicts: {} leak, {} growing, {} stable, {} transient, {} unknown ({} samples, every {every})",
            c.leak, c.growing, c.stable, c.transient, c.unknown, self.timeline.samples
        );
        if self.timeline.samples_without_ages > 0 {
            let _ = writeln!(
                o,
                "  {} samples without ages: too many outstanding blocks to read them all each interval",
                self.timeline.samples_without_ages
            );
        }
        let leaks: Vec<&Site> = self
            .sites
            .iter()
            .filter(|s| s.verdict == Verdict::Leak)
            .collect();
        if leaks.is_empty() {
            let _ = writeln!(
                o,
                "no leaks: no site keeps growing while holding on to its old blocks"
            );
        } else {
            let bytes: u64 = leaks.iter().map(|s| s.outstanding_bytes).sum();
            let rate: f64 = leaks.iter().filter_map(|s| s.growth_bytes_per_s).sum();
            let _ = writeln!(
                o,
                "{}: {}: {}, {}{}",
                style.paint("LEAKS", LEAK),
                if leaks.len() == 1 {
                    "1 site keeps growing and holds on to its old blocks".to_string()
                } else {
                    format!(
                        "{} sites keep growing and hold on to their old blocks",
                        leaks.len()
                    )
                },
                format_bytes(bytes as i64),
                signed_rate(rate),
                if leaks.len() == 1 { "" } else { " together" }
            );
        }
    }

    /// The `top` sites in [`text_order`], then what the others hold.
    fn sites_text(&self, o: &mut String, style: &TextStyle) {
        let top = style.top;
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
            return;
        }
        let shown = self.sites.len().min(top);
        let order: Vec<&Site> = text_order(&self.sites)
            .into_iter()
            .map(|i| &self.sites[i])
            .collect();
        let leaks_first = order.first().is_some_and(|s| text_rank(s.verdict) < 2);
        let _ = writeln!(
            o,
            "\ntop {shown} of {} sites by outstanding bytes{min_age}{}:",
            self.sites.len(),
            if leaks_first { ", leaks first" } else { "" }
        );
        let paths = ShortPaths::of(
            order
                .iter()
                .take(top)
                .flat_map(|s| s.frames.iter())
                .flat_map(frame_paths),
        );
        for (i, site) in order.iter().take(top).enumerate() {
            self.site_text(o, i + 1, site, &paths, style);
        }
        let rest = self.sites.len().saturating_sub(top);
        if rest > 0 {
            let bytes: u64 = order.iter().skip(top).map(|s| s.outstanding_bytes).sum();
            let _ = writeln!(
                o,
                "\n... and {rest} more site{} holding {}{} (all in --format json)",
                if rest == 1 { "" } else { "s" },
                self.est(),
                format_bytes(bytes as i64)
            );
        }
    }

    /// One site: what it holds, its verdict, its stack.
    fn site_text(
        &self,
        o: &mut String,
        rank: usize,
        site: &Site,
        paths: &ShortPaths,
        style: &TextStyle,
    ) {
        let est = self.est();
        let mut extra = site
            .oldest_age_s
            .map(|a| format!(", oldest {}", secs(a)))
            .unwrap_or_default();
        if let Some(m) = site.median_age_s {
            let _ = write!(extra, ", median age {}", secs(m));
        }
        if site.dropped_blocks > 0 {
            let _ = write!(
                extra,
                "; {} more not recorded: block table full",
                format_count(site.dropped_blocks)
            );
        }
        let _ = writeln!(
            o,
            "\n#{rank} {est}{} in {est}{} ({est}{}, {est}{} in all{extra})",
            format_bytes(site.outstanding_bytes as i64),
            counted(site.outstanding_blocks, "block"),
            counted(site.alloc_calls, "allocation"),
            format_bytes(site.alloc_bytes as i64),
        );
        let verdict = site.verdict_text(&self.verdict_config);
        let verdict = match site.verdict {
            Verdict::Leak => style.paint(&verdict, LEAK),
            Verdict::Growing => style.paint(&verdict, GROWING),
            _ => verdict,
        };
        let _ = writeln!(o, "    {verdict}");
        if !site.stack_captured {
            let _ = writeln!(o, "    [stack not captured]");
        }
        let frames: Vec<&Frame> = site.frames.iter().collect();
        // Folded interpreter frames are said where the Python frames start.
        let python = frames
            .iter()
            .position(|f| f.kind == FrameKind::Python)
            .filter(|_| site.native_frames_folded == Some(true));
        let (native, rest) = frames.split_at(python.unwrap_or(frames.len()));
        let exe = self.target.exe.as_deref();
        for line in stack_lines(native, exe, paths, style) {
            let _ = writeln!(o, "    {line}");
        }
        if python.is_some() {
            let _ = writeln!(
                o,
                "      {}",
                style.paint(
                    "… the interpreter's frames (--python-native-frames shows them)",
                    stack_text::FOLD
                )
            );
        }
        for line in stack_lines(rest, exe, paths, style) {
            let _ = writeln!(o, "    {line}");
        }
        if let Some(reason) = site.truncated_reason {
            let _ = writeln!(o, "    [stack truncated: {reason}]");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{
        VerdictCounts,
        fixture::{self, sample, with_verdicts},
    };

    /// The text of reports of every kind, at several `top`s, as it was before
    /// `to_text` was split into sections (`expected/text.txt`).
    #[test]
    fn text_is_written_as_before() {
        let mut out = String::new();
        let reports = [
            ("varied exact", fixture::varied(Sampling::Exact)),
            (
                "varied sampled",
                fixture::varied(Sampling::from_mean(512 * 1024)),
            ),
            ("with verdicts", with_verdicts()),
            ("sample", sample()),
        ];
        for (name, r) in &reports {
            for top in [0, 1, 3, 10] {
                out.push_str(&format!("==== {name}, top {top}\n"));
                out.push_str(&r.to_text(top));
            }
        }
        let mut empty = sample();
        empty.sites.clear();
        empty.min_age_s = 2.5;
        out.push_str("==== no sites\n");
        out.push_str(&empty.to_text(10));
        assert_eq!(out, include_str!("expected/text.txt"));
    }

    #[test]
    fn text_shows_sites_and_limits() {
        let r = sample();
        let t = r.to_text(10);
        assert!(t.contains("700 B in 7 blocks"), "{t}");
        assert!(t.contains("▸ make_buffer at a.c:38\n"), "{t}");
        assert!(t.contains("(inlined)"), "{t}");
        assert!(t.contains("exited with status 7"), "{t}");
        assert!(t.contains("nothing dropped"), "{t}");
        assert!(t.contains("stacks: walked with frame pointers"), "{t}");
        let t0 = r.to_text(0);
        assert!(t0.contains("and 1 more site holding"), "{t0}");
    }

    #[test]
    fn sampled_figures_are_marked_as_estimates() {
        let mut r = sample();
        let exact = r.to_text(10);
        assert!(
            !exact.contains('~') && !exact.contains("sampled:"),
            "{exact}"
        );
        r.sampling = Sampling::from_mean(512 * 1024);
        let t = r.to_text(10);
        assert!(
            t.contains("sampled: one allocation per 512.0 KiB allocated on average"),
            "{t}"
        );
        assert!(t.contains("outstanding: ~700 B in ~7 blocks"), "{t}");
        assert!(t.contains("~700 B in ~7 blocks ("), "{t}");
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(
            v["sampling"],
            serde_json::json!({"mode": "bytes", "mean_bytes": 524288})
        );
    }

    #[test]
    fn text_marks_truncated_stacks() {
        let mut r = sample();
        r.unwind.modules = 3;
        r.unwind.row_bytes = 12 * 1024;
        r.sites[0].truncated = true;
        r.sites[0].truncated_reason = Some("depth limit of 127 frames");
        r.drops.unwind_depth_limit = 1;
        let t = r.to_text(10);
        assert!(
            t.contains("tables of 3 modules (12.0 KiB of kernel memory)"),
            "{t}"
        );
        assert!(
            t.contains("1 of 1 sites have truncated stacks (walks stopped early: 1 depth limit)"),
            "{t}"
        );
        assert!(
            t.contains("[stack truncated: depth limit of 127 frames]"),
            "{t}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["sites"][0]["truncated"], true);
        assert_eq!(v["unwind"]["modules"], 3);
    }

    #[test]
    fn text_says_where_ages_come_from() {
        let mut r = sample();
        assert!(!r.to_text(10).contains("ages:"));
        r.timeline.samples_with_epoch_ages = 4;
        let t = r.to_text(10);
        assert!(
            t.contains("ages: 4 history samples' from per-interval aggregates"),
            "{t}"
        );
        r.ages_from = "epochs";
        let t = r.to_text(10);
        assert!(
            t.contains("ages: the report's and the history's from per-interval aggregates"),
            "{t}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["ages_from"], "epochs");
        assert_eq!(v["timeline"]["samples_with_epoch_ages"], 4);
    }

    #[test]
    fn text_flags_drops() {
        let mut r = sample();
        r.drops.missed_returns = 3;
        r.totals.dropped_events = 3;
        let t = r.to_text(10);
        assert!(t.contains("NOT COMPLETE: 3 events dropped"), "{t}");
        assert!(t.contains("3 return never seen"), "{t}");
        // A full map names the option that makes room.
        r.drops.alloc_map_full = 2;
        r.totals.dropped_events = 5;
        let t = r.to_text(10);
        assert!(
            t.contains("(2 allocation map full: raise --max-blocks, 3 return never seen)"),
            "{t}"
        );
    }

    #[test]
    fn text_never_claims_completeness_while_blind() {
        let mut r = sample();
        assert!(r.to_text(10).contains("nothing dropped"));
        r.untraced_entry_points = vec![
            super::super::UntracedEntryPoint {
                name: "mi_strdup".into(),
                module: "/usr/bin/app".into(),
                reason: None,
            },
            super::super::UntracedEntryPoint {
                name: "malloc".into(),
                module: "/mnt/f/libjemalloc.so.2".into(),
                reason: Some("on a FUSE mount: not probed".into()),
            },
        ];
        let t = r.to_text(10);
        assert!(!t.contains("nothing dropped"), "{t}");
        assert!(
            t.contains(
                "NOT COMPLETE: the target may call 2 allocator functions memtrace does not \
                 trace, whose blocks it does not see: mi_strdup (/usr/bin/app), malloc \
                 (/mnt/f/libjemalloc.so.2: on a FUSE mount: not probed)"
            ),
            "{t}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(
            v["untraced_entry_points"],
            serde_json::json!([
                {"name": "mi_strdup", "module": "/usr/bin/app"},
                {"name": "malloc", "module": "/mnt/f/libjemalloc.so.2",
                 "reason": "on a FUSE mount: not probed"}
            ])
        );
    }

    #[test]
    fn text_leads_with_the_leaks() {
        let r = with_verdicts();
        let t = r.to_text(10);
        assert!(
            t.contains("verdicts: 1 leak, 0 growing, 1 stable, 0 transient, 0 unknown (21 samples, every 200ms)"),
            "{t}"
        );
        assert!(
            t.contains(
                "LEAKS: 1 site keeps growing and holds on to its old blocks: 300 B, +2.0 KiB/s\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("top 2 of 2 sites by outstanding bytes, leaks first:"),
            "{t}"
        );
        let leak = t.find("#1 300 B in 3 blocks (10 allocations, 1000 B in all, oldest 3.2s, median age 2.0s)\n    LEAK: +2.0 KiB/s over 4.0s (21 samples), 100% of its early blocks still held\n");
        let stable = t.find("#2 700 B in 7 blocks (10 allocations, 1000 B in all, oldest 3.2s)\n    stable: +0 B/s over 4.0s (21 samples)\n");
        assert!(leak.is_some() && stable.is_some(), "{t}");
        assert!(
            t.contains("process: rss 20.0 MiB (anonymous 10.0 MiB), vm 80.0 MiB, heap 132.0 KiB, 4 fds, 2 threads (last sampled at 200ms)\n"),
            "{t}"
        );
        assert!(
            t.contains("  over 21 samples: rss +1.0 MiB/s, traced heap +0 B/s; the traced heap is 25% of rss (50% of anonymous rss)\n"),
            "{t}"
        );
        assert!(t.contains("  NOTE: RSS grew 10.0 MiB\n"), "{t}");
        // -n 1 shows the leak, not the larger stable site.
        let t1 = r.to_text(1);
        assert!(t1.contains("leak_fn") && !t1.contains("#2 "), "{t1}");
        assert!(t1.contains("... and 1 more site holding 700 B"), "{t1}");
    }

    #[test]
    fn one_block_is_one_block() {
        let mut r = sample();
        r.sites[0].outstanding_blocks = 1;
        r.sites[0].alloc_calls = 1;
        r.totals.outstanding_blocks = 1;
        r.totals.alloc_calls = 1;
        r.totals.free_calls = 1;
        let t = r.to_text(10);
        assert!(
            t.contains("\n#1 700 B in 1 block (1 allocation, 1000 B in all"),
            "{t}"
        );
        assert!(
            t.contains(
                "outstanding: 700 B in 1 block, from 1 allocation (1000 B) and 1 free while"
            ),
            "{t}"
        );
    }

    #[test]
    fn text_says_when_verdicts_need_more_samples() {
        let mut r = sample();
        r.timeline.samples = 1;
        r.timeline.interval_s = 10.0;
        r.timeline.stride_intervals = 1;
        r.verdicts = VerdictCounts::of(&r.sites);
        r.sites[0].trend.samples = 1;
        let t = r.to_text(10);
        assert!(
            t.contains(
                "verdicts: unknown for every site: 1 sample (every 10.0s), a verdict needs 4"
            ),
            "{t}"
        );
        assert!(
            t.contains("    unknown: 1 sample, a verdict needs 4\n"),
            "{t}"
        );
        assert!(t.contains("top 1 of 1 sites by outstanding bytes:"), "{t}");
    }
}
