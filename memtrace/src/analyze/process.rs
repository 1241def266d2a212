//! The process over the run: its memory's trend, and how much of it the
//! traced heap explains.
use std::time::Duration;

use serde::Serialize;

use super::{VerdictConfig, history::ProcessPoint, stats::theil_sen};
use crate::{
    process::stat::ProcStat,
    units::{format_bytes, format_count, format_duration},
};

/// RSS growth worth a remark: at least this much ...
pub const RSS_NOTE_MIN_GROWTH: u64 = 1 << 20;
/// ... and this share of the first sample's RSS ...
pub const RSS_NOTE_MIN_RELATIVE: f64 = 0.1;
/// ... of which the traced heap's growth explains less than this share.
pub const RSS_NOTE_MAX_EXPLAINED: f64 = 0.25;

/// The process over the run. In the JSON report as `process.summary`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessSummary {
    pub samples: usize,
    pub first: Option<ProcStat>,
    pub last: Option<ProcStat>,
    pub peak_rss_bytes: Option<u64>,
    /// Theil–Sen slopes over the samples.
    pub rss_growth_bytes_per_s: Option<f64>,
    pub traced_growth_bytes_per_s: Option<f64>,
    /// Outstanding traced bytes over RSS (and anonymous RSS) at the last sample.
    pub traced_share_of_rss: Option<f64>,
    pub traced_share_of_anon_rss: Option<f64>,
    /// Set when RSS grew and the traced heap explains little of it.
    pub note: Option<String>,
}

/// Summarizes the process samples. The note: with at least `min_samples`
/// samples, RSS grew (Theil–Sen slope × span) by at least
/// [`RSS_NOTE_MIN_GROWTH`] and [`RSS_NOTE_MIN_RELATIVE`] of its first value,
/// and the traced heap grew by less than [`RSS_NOTE_MAX_EXPLAINED`] of that.
/// `unrecorded`: allocations memtrace had no room for (a full block table):
/// the traced heap misses them, so the note names them as a likely place of
/// the growth instead of sending the reader outside the heap.
pub fn summarize_process(
    samples: &[ProcessPoint],
    cfg: &VerdictConfig,
    unrecorded: u64,
) -> ProcessSummary {
    let mut s = ProcessSummary {
        samples: samples.len(),
        first: samples.first().map(|p| p.stat),
        last: samples.last().map(|p| p.stat),
        peak_rss_bytes: samples.iter().map(|p| p.stat.rss_bytes).max(),
        ..Default::default()
    };
    let Some(last) = samples.last() else {
        return s;
    };
    let share = |d: u64| (d > 0).then(|| last.traced_bytes.max(0) as f64 / d as f64);
    s.traced_share_of_rss = share(last.stat.rss_bytes);
    s.traced_share_of_anon_rss = share(last.stat.rss_anon_bytes);
    let t0 = samples[0].t_ns;
    let ts: Vec<f64> = samples
        .iter()
        .map(|p| p.t_ns.saturating_sub(t0) as f64 / 1e9)
        .collect();
    let rss: Vec<f64> = samples.iter().map(|p| p.stat.rss_bytes as f64).collect();
    let traced: Vec<f64> = samples.iter().map(|p| p.traced_bytes as f64).collect();
    s.rss_growth_bytes_per_s = theil_sen(&ts, &rss);
    s.traced_growth_bytes_per_s = theil_sen(&ts, &traced);
    let span = ts[ts.len() - 1];
    if samples.len() >= cfg.min_samples
        && let (Some(r), Some(h)) = (s.rss_growth_bytes_per_s, s.traced_growth_bytes_per_s)
    {
        let rss_growth = r * span;
        let heap_growth = h * span;
        let first_rss = samples[0].stat.rss_bytes as f64;
        if rss_growth >= RSS_NOTE_MIN_GROWTH as f64
            && rss_growth >= RSS_NOTE_MIN_RELATIVE * first_rss
            && heap_growth < RSS_NOTE_MAX_EXPLAINED * rss_growth
        {
            let grew = format!(
                "RSS grew {} in {} while the traced heap grew {}",
                format_bytes(rss_growth as i64),
                format_duration(Duration::from_secs_f64(span)),
                format_bytes(heap_growth as i64),
            );
            s.note = Some(if unrecorded > 0 {
                format!(
                    "{grew}, but {} allocations were not recorded (memtrace's tables were \
                     full: raise --max-blocks): the traced heap misses them, and the growth \
                     may well be theirs",
                    format_count(unrecorded)
                )
            } else {
                format!(
                    "{grew}: the growth is outside the traced heap: memory not from malloc \
                     (mmap, thread stacks, another allocator) or fragmentation (freed memory \
                     the allocator does not give back)"
                )
            });
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn proc_at(t_s: u64, rss_mib: u64, traced: i64) -> ProcessPoint {
        ProcessPoint {
            t_ns: t_s * S,
            stat: ProcStat {
                rss_bytes: rss_mib << 20,
                rss_anon_bytes: (rss_mib << 20) / 2,
                threads: 1,
                ..Default::default()
            },
            traced_bytes: traced,
        }
    }

    #[test]
    fn rss_growth_outside_the_heap_is_noted() {
        let cfg = VerdictConfig::default();
        // RSS +1 MiB/s, traced heap flat.
        let samples: Vec<_> = (0..10).map(|i| proc_at(i, 10 + i, 1 << 20)).collect();
        let s = summarize_process(&samples, &cfg, 0);
        assert_eq!(s.rss_growth_bytes_per_s, Some((1 << 20) as f64));
        assert_eq!(s.traced_growth_bytes_per_s, Some(0.0));
        assert_eq!(s.traced_share_of_rss, Some(1.0 / 19.0));
        assert_eq!(s.traced_share_of_anon_rss, Some(2.0 / 19.0));
        assert_eq!(s.peak_rss_bytes, Some(19 << 20));
        let note = s.note.expect("a note");
        assert!(note.contains("RSS grew 9.0 MiB"), "{note}");
        assert!(note.contains("fragmentation"), "{note}");
        // Allocations memtrace had no room for: named, not sent elsewhere.
        let note = summarize_process(&samples, &cfg, 1234)
            .note
            .expect("a note");
        assert!(
            note.contains("1,234 allocations were not recorded"),
            "{note}"
        );
        assert!(note.contains("--max-blocks"), "{note}");
        assert!(!note.contains("outside the traced heap"), "{note}");
        // The traced heap grows with RSS: explained, no note.
        let samples: Vec<_> = (0..10)
            .map(|i| proc_at(i, 10 + i, (i as i64) << 20))
            .collect();
        assert_eq!(summarize_process(&samples, &cfg, 0).note, None);
        // RSS flat: no note. Too few samples: no note.
        let samples: Vec<_> = (0..10).map(|i| proc_at(i, 10, 0)).collect();
        assert_eq!(summarize_process(&samples, &cfg, 0).note, None);
        let samples: Vec<_> = (0..3).map(|i| proc_at(i, 10 + 10 * i, 0)).collect();
        assert_eq!(summarize_process(&samples, &cfg, 0).note, None);
        assert_eq!(summarize_process(&[], &cfg, 0), ProcessSummary::default());
    }
}
