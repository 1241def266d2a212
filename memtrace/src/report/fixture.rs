//! Reports for the JSON writer's tests: every kind of value the schema holds
//! (nulls, non-finite floats, escapes, shared and unshared frame groups), and
//! a report at scale for timing; and the small reports the writers' tests
//! start from.
use std::sync::Arc;

use super::*;
use crate::{analyze::Trend, kernel::tables::TableStats};

fn frame_in(
    address: u64,
    module: Option<&str>,
    function: Option<&str>,
    line: Option<u32>,
) -> Frame {
    Frame {
        address,
        module: module.map(Into::into),
        function: function.map(Into::into),
        file: function.map(|f| format!("/src/{f}.c")),
        line,
        inlined: false,
        kind: crate::symbolize::FrameKind::Native,
        unresolved: None,
    }
}

fn stat(rss: u64, optional: bool) -> ProcStat {
    ProcStat {
        rss_bytes: rss,
        rss_anon_bytes: rss / 3,
        vm_size_bytes: 5 * rss,
        heap_bytes: optional.then_some(132 << 10),
        swap_bytes: optional.then_some(0),
        fds: optional.then_some(9),
        threads: 3,
    }
}

pub fn sample() -> Report {
    Report {
        schema: SCHEMA,
        memtrace_version: "0.1.0",
        target: TargetInfo {
            pid: 42,
            exe: Some("/usr/bin/app".into()),
            cmdline: vec!["app".into()],
            exited: true,
            exit_status: Some(7),
            namespaces: Namespaces {
                ns_pid: Some(42),
                ..Default::default()
            },
        },
        started_at: "2026-11-23T07:00:00Z".into(),
        ended_at: "2026-11-23T07:00:12Z".into(),
        duration_s: 12.5,
        end_reason: "target-exited",
        sampling: Sampling::Exact,
        totals: Totals {
            alloc_calls: 10,
            free_calls: 3,
            alloc_bytes: 1000,
            outstanding_blocks: 7,
            outstanding_bytes: 700,
            ..Default::default()
        },
        drops: Drops::default(),
        untraced_entry_points: Vec::new(),
        allocator: AllocatorInfo {
            module: "/lib/libc.so.6".into(),
            functions: vec!["malloc".into()],
            modules: vec![AllocatorModule {
                module: "/lib/libc.so.6".into(),
                functions: vec!["malloc".into()],
                forwarded: vec![],
            }],
            probes: 2,
            probe_sites: vec!["malloc+0x0 (push)".into()],
            probe_mechanism: "uprobe-session",
            return_probes: 10,
            calls_in_session_cookie: vec!["malloc".into()],
            own_calls_told_by: "call-site probes",
            own_call_sites: vec!["realloc+0x40 (jmp malloc)".into()],
            result_sites: vec!["malloc+0x157 (jne)".into()],
        },
        min_age_s: 0.0,
        ages_from: "blocks",
        verdict_config: VerdictConfig::default(),
        timeline: Timeline::default(),
        verdicts: VerdictCounts::default(),
        process: ProcessReport::default(),
        unwind: Default::default(),
        attach: Default::default(),
        attached: false,
        modules: vec![super::ModuleInfo {
            path: "/usr/bin/app".into(),
            start: 0x400000,
            limit: 0x402000,
            file_offset: 0,
            build_id: Some("0123abcd".into()),
        }],
        freed_sites: vec![],
        freed_sites_left_out: LeftOut::default(),
        cut_short: vec![],
        snapshots: None,
        lineage: None,
        resources: None,
        sites: vec![Site {
            outstanding_blocks: 7,
            outstanding_bytes: 700,
            peak_bytes: 900,
            alloc_calls: 10,
            dropped_blocks: 0,
            alloc_bytes: 1000,
            oldest_age_s: Some(3.2),
            median_age_s: None,
            verdict: Verdict::Unknown,
            growth_bytes_per_s: None,
            trend: Trend::default(),
            history: vec![],
            stack_captured: true,
            stack_walk: "unwind-tables",
            truncated: false,
            truncated_reason: None,
            native_frames_folded: None,
            frames: vec![
                Frame {
                    address: 0x401136,
                    module: Some("/usr/bin/app".into()),
                    function: Some("helper".into()),
                    file: Some("/src/a.c".into()),
                    line: Some(9),
                    inlined: true,
                    kind: crate::symbolize::FrameKind::Native,
                    unresolved: None,
                },
                Frame {
                    address: 0x401136,
                    module: Some("/usr/bin/app".into()),
                    function: Some("make_buffer".into()),
                    file: Some("/src/a.c".into()),
                    line: Some(38),
                    inlined: false,
                    kind: crate::symbolize::FrameKind::Native,
                    unresolved: None,
                },
            ]
            .into(),
        }],
    }
}
pub fn frame(address: u64, function: &str, line: u32) -> Frame {
    Frame {
        address,
        module: Some("/usr/bin/app".into()),
        function: Some(function.into()),
        file: Some("/src/a.c".into()),
        line: Some(line),
        inlined: false,
        kind: crate::symbolize::FrameKind::Native,
        unresolved: None,
    }
}

/// The sample with a stable site (the larger) and a leak, a history and a process view.
pub fn with_verdicts() -> Report {
    let mut r = sample();
    r.verdict_config = VerdictConfig::for_interval(std::time::Duration::from_millis(200));
    r.timeline = Timeline {
        interval_s: 0.2,
        samples: 21,
        capacity: 128,
        stride_intervals: 1,
        samples_without_ages: 0,
        samples_with_epoch_ages: 0,
    };
    r.sites[0].verdict = Verdict::Stable;
    r.sites[0].growth_bytes_per_s = Some(0.0);
    r.sites[0].trend = Trend {
        samples: 21,
        span_s: 4.0,
        growth_bytes_per_s: Some(0.0),
        ..Default::default()
    };
    let mut leak = r.sites[0].clone();
    leak.outstanding_bytes = 300;
    leak.peak_bytes = 300;
    leak.outstanding_blocks = 3;
    leak.verdict = Verdict::Leak;
    leak.growth_bytes_per_s = Some(2048.0);
    leak.median_age_s = Some(2.0);
    leak.trend = Trend {
        samples: 21,
        span_s: 4.0,
        growth_bytes_per_s: Some(2048.0),
        early_blocks_retained: Some(1.0),
        ..Default::default()
    };
    leak.history = vec![
        HistoryPoint {
            t_s: 0.2,
            outstanding_bytes: 100,
            outstanding_blocks: 1,
            oldest_age_s: Some(0.1),
            median_age_s: Some(0.1),
        },
        HistoryPoint {
            t_s: 4.2,
            outstanding_bytes: 300,
            outstanding_blocks: 3,
            oldest_age_s: None,
            median_age_s: None,
        },
    ];
    let mut frames: Vec<Frame> = leak.frames.iter().cloned().collect();
    frames[1].function = Some("leak_fn".into());
    leak.frames = frames.into();
    r.sites.push(leak);
    r.verdicts = VerdictCounts::of(&r.sites);
    let stat = |rss: u64| ProcStat {
        rss_bytes: rss,
        rss_anon_bytes: rss / 2,
        vm_size_bytes: 4 * rss,
        heap_bytes: Some(132 << 10),
        swap_bytes: Some(0),
        fds: Some(4),
        threads: 2,
    };
    r.process = ProcessReport {
        samples: vec![ProcessSample {
            t_s: 0.2,
            stat: stat(10 << 20),
            traced_bytes: 1000,
        }],
        summary: ProcessSummary {
            samples: 21,
            first: Some(stat(10 << 20)),
            last: Some(stat(20 << 20)),
            rss_growth_bytes_per_s: Some(1048576.0),
            traced_growth_bytes_per_s: Some(0.0),
            traced_share_of_rss: Some(0.25),
            traced_share_of_anon_rss: Some(0.5),
            note: Some("RSS grew 10.0 MiB".into()),
            ..Default::default()
        },
    };
    r
}

/// Sites that share frames, with values that are null, non-finite or need
/// escaping, and every optional key both present and absent.
fn varied_sites() -> Vec<Site> {
    let shared: Arc<[Frame]> = vec![
        Frame {
            inlined: true,
            ..frame_in(0x401136, Some("/usr/bin/app"), Some("helper"), Some(9))
        },
        frame_in(
            0x401136,
            Some("/usr/bin/app"),
            Some("make_buffer"),
            Some(38),
        ),
    ]
    .into();
    let main: Arc<[Frame]> =
        vec![frame_in(0x401000, Some("/usr/bin/app"), Some("main"), None)].into();
    let odd: Arc<[Frame]> = vec![
        Frame {
            unresolved: Some(crate::symbolize::Unresolved::NoSymbol),
            ..frame_in(u64::MAX, Some("/lib/\"quoted\"\n\u{1}é.so"), None, None)
        },
        Frame {
            file: Some("C:\\path\\ü\t.c".into()),
            ..frame_in(0, None, Some("ns::f<\u{7f}>()"), Some(u32::MAX))
        },
    ]
    .into();
    let group = |fs: &[Arc<[Frame]>]| {
        let mut f = Frames::default();
        f.reserve(fs.len());
        for g in fs {
            f.push_group(g.clone());
        }
        f
    };
    let leaf = |a: u64, name: &str| -> Arc<[Frame]> {
        vec![frame_in(
            a,
            Some("/usr/bin/app"),
            Some(name),
            Some(a as u32 % 97),
        )]
        .into()
    };
    let empty: Arc<[Frame]> = Vec::new().into();
    let site = |bytes: u64, verdict: Verdict, frames: Frames| Site {
        outstanding_blocks: bytes / 16,
        outstanding_bytes: bytes,
        peak_bytes: bytes + bytes / 2,
        alloc_calls: bytes / 8,
        dropped_blocks: 0,
        alloc_bytes: bytes * 3,
        oldest_age_s: Some(3.25),
        median_age_s: None,
        verdict,
        growth_bytes_per_s: None,
        stack_captured: true,
        stack_walk: "unwind-tables",
        truncated: false,
        truncated_reason: None,
        native_frames_folded: None,
        frames,
        trend: Trend::default(),
        history: vec![],
    };
    let mut sites = vec![
        Site {
            median_age_s: Some(1.5),
            growth_bytes_per_s: Some(2048.0),
            trend: Trend {
                samples: 21,
                span_s: 4.0,
                growth_bytes_per_s: Some(2048.0),
                recent_growth_bytes_per_s: Some(1999.875),
                relative_growth: Some(2.0 / 3.0),
                growth_share: Some(1.0),
                early_blocks_retained: Some(0.95),
                max_oldest_age_s: Some(4.000000001),
            },
            history: vec![
                HistoryPoint {
                    t_s: 0.2,
                    outstanding_bytes: 100,
                    outstanding_blocks: 1,
                    oldest_age_s: Some(0.1),
                    median_age_s: Some(0.1),
                },
                HistoryPoint {
                    t_s: 4.2,
                    outstanding_bytes: 300,
                    outstanding_blocks: 3,
                    oldest_age_s: None,
                    median_age_s: None,
                },
            ],
            ..site(
                1 << 20,
                Verdict::Leak,
                group(&[leaf(0x401200, "leaky"), shared.clone(), main.clone()]),
            )
        },
        site(
            700,
            Verdict::Stable,
            group(&[leaf(0x401300, "cache"), shared.clone(), empty, main.clone()]),
        ),
        Site {
            median_age_s: Some(f64::NAN),
            oldest_age_s: None,
            growth_bytes_per_s: Some(f64::INFINITY),
            truncated: true,
            truncated_reason: Some("depth limit of 127 frames"),
            native_frames_folded: None,
            stack_walk: "frame-pointers",
            trend: Trend {
                samples: 3,
                span_s: 1.5e-7,
                growth_bytes_per_s: Some(-12.25),
                recent_growth_bytes_per_s: None,
                relative_growth: Some(f64::NEG_INFINITY),
                growth_share: Some(0.0),
                early_blocks_retained: None,
                max_oldest_age_s: Some(123456789.125),
            },
            history: vec![
                HistoryPoint {
                    t_s: 1e21,
                    outstanding_bytes: -5,
                    outstanding_blocks: i64::MAX,
                    oldest_age_s: None,
                    median_age_s: Some(0.1),
                },
                HistoryPoint {
                    t_s: 5e-324,
                    outstanding_bytes: 0,
                    outstanding_blocks: i64::MIN,
                    oldest_age_s: Some(f64::NAN),
                    median_age_s: None,
                },
            ],
            ..site(
                600,
                Verdict::Growing,
                group(&[odd.clone(), shared.clone(), odd.clone()]),
            )
        },
        Site {
            outstanding_blocks: u64::MAX,
            ..site(
                500,
                Verdict::Transient,
                group(&[leaf(0x401400, "tmp"), main]),
            )
        },
        Site {
            stack_captured: false,
            oldest_age_s: None,
            ..site(400, Verdict::Unknown, Frames::default())
        },
    ];
    // The same frames in one group that no other site holds.
    let unshared: Vec<Frame> = sites[0].frames.iter().cloned().collect();
    sites.push(site(300, Verdict::Unknown, unshared.into()));
    sites
}

/// A report of [`varied_sites`], with every other part of the report filled
/// in (optional values present when exact, absent when sampled).
pub fn varied(sampling: Sampling) -> Report {
    let sites = varied_sites();
    let mut drops = Drops {
        missed_returns: 3,
        unwind_depth_limit: 1,
        unwind_fp_fallback_frames: 17,
        ..Default::default()
    };
    drops.unresolved_frames.insert("no_symbol".into(), 2);
    drops.unresolved_frames.insert("unmapped \"x\"".into(), 1);
    let sampled = sampling.is_sampled();
    Report {
        schema: SCHEMA,
        memtrace_version: "0.1.0",
        target: TargetInfo {
            pid: 4242,
            exe: (!sampled).then(|| "/usr/bin/app".into()),
            cmdline: vec!["app".into(), "--name=\"x\"\n".into()],
            exited: !sampled,
            exit_status: (!sampled).then_some(-7),
            // Exact: a container's process (its own pid and mount namespaces
            // and root).
            namespaces: match sampled {
                false => Namespaces {
                    ns_pid: Some(7),
                    own_namespaces: vec!["pid", "mnt"],
                    own_root: true,
                },
                true => Namespaces {
                    ns_pid: Some(4242),
                    ..Default::default()
                },
            },
        },
        started_at: "2026-11-23T07:00:00Z".into(),
        ended_at: "2026-11-23T07:00:12Z".into(),
        duration_s: 12.345678,
        end_reason: if sampled { "signal" } else { "target-exited" },
        sampling,
        totals: Totals {
            alloc_calls: 10,
            free_calls: 3,
            alloc_bytes: 1000,
            outstanding_blocks: 7,
            outstanding_bytes: 700,
            dropped_events: 3,
            stack_errors: 1,
            free_unknown: 2,
            failed_allocs: 1,
            sites_seen: 9,
            allocator_internal_calls: 4,
            allocator_own_frees: 0,
        },
        drops,
        untraced_entry_points: Vec::new(),
        allocator: AllocatorInfo {
            module: "/lib/libc.so.6".into(),
            functions: vec!["malloc".into(), "free".into()],
            modules: vec![AllocatorModule {
                module: "/lib/libc.so.6".into(),
                functions: vec!["malloc".into(), "free".into()],
                forwarded: vec![],
            }],
            probes: 2,
            probe_sites: vec!["malloc+0x0 (push)".into()],
            probe_mechanism: "uprobe-session",
            return_probes: 10,
            calls_in_session_cookie: vec![],
            own_calls_told_by: "call-site probes",
            own_call_sites: vec!["realloc+0x40 (jmp malloc)".into()],
            result_sites: vec!["malloc+0x157 (jne)".into()],
        },
        min_age_s: 0.1,
        ages_from: if sampled { "epochs" } else { "blocks" },
        verdict_config: VerdictConfig::for_interval(std::time::Duration::from_millis(333)),
        timeline: Timeline {
            interval_s: 0.333,
            samples: 21,
            capacity: 128,
            stride_intervals: 2,
            samples_without_ages: 1,
            samples_with_epoch_ages: 4,
        },
        verdicts: VerdictCounts::of(&sites),
        process: ProcessReport {
            samples: vec![
                ProcessSample {
                    t_s: 0.333,
                    stat: stat(10 << 20, true),
                    traced_bytes: 1000,
                },
                ProcessSample {
                    t_s: 0.666,
                    stat: stat(11 << 20, false),
                    traced_bytes: -1,
                },
            ],
            summary: ProcessSummary {
                samples: 2,
                first: Some(stat(10 << 20, true)),
                last: Some(stat(11 << 20, false)),
                peak_rss_bytes: Some(11 << 20),
                rss_growth_bytes_per_s: Some(1048576.0 / 0.333),
                traced_growth_bytes_per_s: None,
                traced_share_of_rss: Some(f64::NAN),
                traced_share_of_anon_rss: Some(0.5),
                note: Some("RSS grew \"a lot\"".into()),
            },
        },
        unwind: TableStats {
            modules: 3,
            rows: 1000,
            row_bytes: 12000,
            mappings: 5,
            pages: 40,
            modules_without_tables: vec!["/lib/x.so".into()],
            capacity_rows: 1 << 20,
        },
        attach: AttachTimes {
            total_s: 0.4123,
            steps: vec![
                ("create_maps".into(), 0.0121),
                ("verify_alloc_session".into(), 0.2),
            ],
        },
        attached: true,
        modules: Vec::new(),
        freed_sites: varied_freed_sites(&sites),
        freed_sites_left_out: LeftOut {
            sites: 2,
            alloc_calls: 30,
            alloc_bytes: 4000,
        },
        cut_short: vec!["module capture: /mnt/\"slow\"\n.so did not answer in 2s".into()],
        snapshots: None,
        lineage: None,
        resources: None,
        sites,
    }
}

/// Freed sites like those of a real report: one whose blocks were all freed,
/// with a history, and one that still holds blocks younger than --min-age.
fn varied_freed_sites(sites: &[Site]) -> Vec<Site> {
    let mut all_freed = sites[0].clone();
    all_freed.outstanding_blocks = 0;
    all_freed.outstanding_bytes = 0;
    all_freed.alloc_calls = 500;
    all_freed.alloc_bytes = 51200;
    all_freed.oldest_age_s = None;
    all_freed.median_age_s = None;
    all_freed.verdict = Verdict::Transient;
    let mut young = sites[1].clone();
    young.outstanding_blocks = 3;
    young.outstanding_bytes = 96;
    young.alloc_calls = 40;
    young.alloc_bytes = 1280;
    young.oldest_age_s = Some(0.05);
    young.history.clear();
    vec![all_freed, young]
}

/// A report of `n` sites shaped like the report at scale: each site a leaf
/// of its own under callers that many sites share, a short history each.
pub fn at_scale(n: usize) -> Report {
    let mut r = varied(Sampling::Exact);
    let callers: Vec<Arc<[Frame]>> = (0..64u64)
        .map(|i| {
            vec![frame_in(
                0x500000 + i,
                Some("/usr/lib/x86_64-linux-gnu/libexample.so.1"),
                Some(&format!("example::module::caller_{i}")),
                Some(i as u32 + 100),
            )]
            .into()
        })
        .collect();
    let template = r.sites[0].clone();
    r.sites = (0..n as u64)
        .map(|i| {
            let mut frames = Frames::default();
            frames.push_group(
                vec![frame_in(
                    0x400000 + i,
                    Some("/usr/bin/scale"),
                    Some("leaf_fn"),
                    Some(i as u32),
                )]
                .into(),
            );
            for k in 0..10u64 {
                frames.push_group(callers[((i / (k + 1)) % 64) as usize].clone());
            }
            Site {
                outstanding_bytes: 1600 + i,
                frames,
                ..template.clone()
            }
        })
        .collect();
    r
}
