//! Telling leaks from caches: verdicts per site from the history sampled every
//! interval, `--fail-on-leak`, `--alert-growth`, the process view, and
//! `memtrace diff` of two snapshots, on tests/fixtures/verdicts.c (startup
//! data, a bounded cache, a steady leak, a leak that starts halfway,
//! short-lived requests, churn).
//!
//! Three traced runs are shared by the tests (and made one at a time: the
//! fixture's ticks should not stretch because two traced runs share 2 cores):
//! a launch run of 200 ticks (JSON), one of 100 ticks exiting 5 (JSON, the old
//! snapshot for the diff), and an attach run of 150 ticks (text report).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use memtrace_tests::*;
use serde_json::Value;

const FIXTURE: &str = "verdicts";
const LONG_TICKS: u64 = 200;
const SHORT_TICKS: u64 = 100;
const ATTACH_TICKS: u64 = 150;

/// One expected site of verdicts.c: frame 0 is `function` at `marker`.
struct Expect {
    function: &'static str,
    marker: &'static str,
    size: u64,
    verdict: &'static str,
}

const STEADY: Expect = Expect {
    function: "steady_leak",
    marker: "steady_leak",
    size: 256,
    verdict: "leak",
};
const LATE: Expect = Expect {
    function: "late_leak",
    marker: "late_leak",
    size: 384,
    verdict: "leak",
};
const STARTUP: Expect = Expect {
    function: "load_startup_tables",
    marker: "startup",
    size: 1000,
    verdict: "stable",
};
const CACHE: Expect = Expect {
    function: "cache_put",
    marker: "cache_put",
    size: 512,
    verdict: "stable",
};
const INFLIGHT: Expect = Expect {
    function: "handle_request",
    marker: "inflight",
    size: 200,
    verdict: "transient",
};

impl Expect {
    /// Outstanding blocks after `ticks` ticks.
    fn blocks(&self, ticks: u64) -> u64 {
        match self.marker {
            "steady_leak" => ticks,
            "late_leak" => ticks - ticks / 2,
            "startup" => 50,
            "cache_put" => 60,
            "inflight" => 2,
            m => unreachable!("{m}"),
        }
    }

    fn line(&self) -> u32 {
        source_line(FIXTURE, self.marker)
    }

    fn site<'r>(&self, r: &'r Report) -> &'r Value {
        r.site_at(self.function, self.line())
    }
}

const ALL: [&Expect; 5] = [&STEADY, &LATE, &STARTUP, &CACHE, &INFLIGHT];

fn bin() -> PathBuf {
    build_fixture(FIXTURE, Variant::FramePointers)
}

// ---- shared runs --------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

fn panic_message(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Makes the run of `cell` once (one traced run at a time); a failure is
/// reported by every test that looks at it.
fn shared<T>(cell: &'static OnceLock<Result<T, String>>, make: impl FnOnce() -> T) -> &'static T {
    require_root();
    require_memtrace();
    let made = cell.get_or_init(|| {
        let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        catch_unwind(AssertUnwindSafe(make)).map_err(panic_message)
    });
    match made {
        Ok(v) => v,
        Err(e) => panic!("the shared run this test looks at failed:\n{e}"),
    }
}

/// `memtrace ARGS -f json -- verdicts launch FIXTURE_ARGS`, with `env` set for memtrace.
fn launch(args: &[&str], fixture_args: &[&str], env: &[(&str, &str)]) -> Run {
    let bin = bin();
    let mut cmd = vec![bin.to_str().unwrap(), "launch"];
    cmd.extend_from_slice(fixture_args);
    run_launch_env(args, &cmd, env)
}

/// `memtrace -i 200ms --fail-on-leak --alert-growth 1KiB/s -f json -- verdicts launch 200`.
fn long_run() -> &'static Run {
    static CELL: OnceLock<Result<Run, String>> = OnceLock::new();
    shared(&CELL, || {
        launch(
            &["-i", "200ms", "--fail-on-leak", "--alert-growth", "1KiB/s"],
            &[LONG_TICKS.to_string().as_str()],
            &[],
        )
    })
}

/// `memtrace -i 200ms --fail-on-leak -f json -- verdicts launch 100 5`.
fn short_run() -> &'static Run {
    static CELL: OnceLock<Result<Run, String>> = OnceLock::new();
    shared(&CELL, || {
        launch(
            &["-i", "200ms", "--fail-on-leak"],
            &[SHORT_TICKS.to_string().as_str(), "5"],
            &[],
        )
    })
}

/// An attach run with the text report on stdout.
struct TextRun {
    out: Output,
    /// The fixture went on and exited 0 once memtrace was gone.
    unharmed: Result<(), String>,
}

fn attach_text_run() -> &'static TextRun {
    static CELL: OnceLock<Result<TextRun, String>> = OnceLock::new();
    shared(&CELL, || {
        let ticks = ATTACH_TICKS.to_string();
        let mut target = TestProcess::spawn_ready(&bin(), &["attach", &ticks]);
        let mut c = memtrace_command();
        c.args(["-i", "200ms", "--fail-on-leak", "--pid"])
            .arg(target.pid().to_string());
        let mut m = Memtrace::spawn(c);
        m.wait_attached();
        target.go();
        target.wait_done();
        m.signal(libc::SIGINT);
        let status = m.wait(EXIT_TIMEOUT);
        let out = Output {
            status,
            stdout: m.stdout(),
            stderr: m.stderr(),
        };
        assert_no_panic(&out.stderr);
        let unharmed =
            catch_unwind(AssertUnwindSafe(|| target.finish_unharmed())).map_err(panic_message);
        TextRun { out, unharmed }
    })
}

fn verdict(site: &Value) -> &str {
    site["verdict"].as_str().unwrap_or("(none)")
}

/// Asserts every expected site holds exactly its blocks, has its verdict, and
/// nothing else is there (the churn is not).
fn assert_sites(r: &Report, ticks: u64) {
    for e in ALL {
        let site = e.site(r);
        let blocks = e.blocks(ticks);
        assert_eq!(
            (Report::blocks(site), Report::bytes(site)),
            (blocks, blocks * e.size),
            "{}: outstanding (blocks, bytes)\n{}",
            e.function,
            r.summary()
        );
        assert_eq!(
            verdict(site),
            e.verdict,
            "{}: verdict; trend {}\n{}",
            e.function,
            site["trend"],
            r.summary()
        );
    }
    assert_eq!(r.sites().len(), ALL.len(), "{}", r.summary());
    assert!(
        r.sites_containing("churn").is_empty(),
        "short-lived churn is no site:\n{}",
        r.summary()
    );
}

// ---- verdicts -------------------------------------------------------------------------

/// The sites and verdicts of a launch run of LONG_TICKS ticks.
fn assert_long_run_verdicts(r: &Report) {
    assert_sites(r, LONG_TICKS);
    assert_eq!(
        r.0["verdicts"],
        serde_json::json!({"leak": 2, "growing": 0, "stable": 2, "transient": 1, "unknown": 0}),
        "{}",
        r.summary()
    );
    // Startup data never changes: no growth at all. The leaks grow.
    assert_eq!(STARTUP.site(r)["growth_bytes_per_s"].as_f64(), Some(0.0));
    for e in [&STEADY, &LATE] {
        let g = e.site(r)["growth_bytes_per_s"].as_f64().unwrap();
        assert!(g > 0.0, "{}: growth {g}", e.function);
        assert_eq!(
            e.site(r)["trend"]["early_blocks_retained"].as_f64(),
            Some(1.0),
            "{}",
            e.function
        );
    }
}

#[test]
fn only_the_two_leaks_get_the_leak_verdict() {
    let r = &long_run().report;
    assert_long_run_verdicts(r);
    assert_eq!(r.0["verdict_config"]["min_samples"], 4);
    assert_eq!(
        r.0["verdict_config"]["transient_max_age_s"].as_f64(),
        Some(0.4)
    );
    assert_eq!(r.0["timeline"]["interval_s"].as_f64(), Some(0.2));
    assert_eq!(r.0["timeline"]["samples_without_ages"], 0);
}

/// The long run again, with every sample's ages (and the report's) taken from
/// the kernel's per-epoch aggregates instead of every block
/// (`MEMTRACE_AGES=epochs`; memtrace does so on its own above 100,000 blocks).
fn epochs_run() -> &'static Run {
    static CELL: OnceLock<Result<Run, String>> = OnceLock::new();
    shared(&CELL, || {
        launch(
            &["-i", "200ms", "--fail-on-leak"],
            &[LONG_TICKS.to_string().as_str()],
            &[("MEMTRACE_AGES", "epochs")],
        )
    })
}

#[test]
fn ages_from_epoch_aggregates_give_the_same_verdicts() {
    let run = epochs_run();
    run.assert_exit(3);
    let r = &run.report;
    assert_eq!(r.0["ages_from"], "epochs", "{}", r.summary());
    let samples = r.0["timeline"]["samples"].as_u64().unwrap();
    assert!(samples >= 8, "{samples} samples");
    assert_eq!(r.0["timeline"]["samples_with_epoch_ages"], samples);
    assert_long_run_verdicts(r);
    // One request per tick, each freed two ticks later: the aggregates of its
    // past epochs were emptied and removed, and their calls still count.
    assert_eq!(
        u64_field(INFLIGHT.site(r), "alloc_calls"),
        LONG_TICKS,
        "{}",
        r.summary()
    );
    // Ages: the startup tables are as old as the run (within an interval), the
    // requests younger than the transient limit.
    let duration = r.0["duration_s"].as_f64().unwrap();
    let startup = STARTUP.site(r)["oldest_age_s"].as_f64().unwrap();
    assert!(
        startup <= duration + 0.1 && startup >= duration - 0.4,
        "startup oldest_age_s {startup}, run {duration} s"
    );
    let inflight = INFLIGHT.site(r)["oldest_age_s"].as_f64().unwrap();
    assert!(inflight < 0.4, "inflight oldest_age_s {inflight}");
    assert_eq!(
        r.total("alloc_calls"),
        long_run().report.total("alloc_calls")
    );
}

#[test]
fn every_site_has_its_history() {
    let r = &long_run().report;
    let samples = r.0["timeline"]["samples"].as_u64().unwrap();
    for e in ALL {
        let site = e.site(r);
        let h = site["history"].as_array().expect("history");
        assert!(h.len() >= 4, "{}: {} samples", e.function, h.len());
        assert!(h.len() as u64 <= samples);
        let t: Vec<f64> = h.iter().map(|p| p["t_s"].as_f64().unwrap()).collect();
        assert!(
            t.windows(2).all(|w| w[0] < w[1]),
            "{}: times {t:?}",
            e.function
        );
        // The last sample is the end of tracing: the figures of the report.
        let last = h.last().unwrap();
        assert_eq!(
            (
                u64_field(last, "outstanding_blocks"),
                u64_field(last, "outstanding_bytes")
            ),
            (Report::blocks(site), Report::bytes(site)),
            "{}",
            e.function
        );
        assert_eq!(last["oldest_age_s"], site["oldest_age_s"], "{}", e.function);
        assert_eq!(last["median_age_s"], site["median_age_s"], "{}", e.function);
        assert_eq!(
            site["trend"]["samples"].as_u64(),
            Some(h.len() as u64),
            "{}",
            e.function
        );
    }
    // A leak's blocks only ever grow; the startup data's never change.
    let blocks = |e: &Expect| -> Vec<u64> {
        e.site(r)["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| u64_field(p, "outstanding_blocks"))
            .collect()
    };
    let steady = blocks(&STEADY);
    assert!(steady.windows(2).all(|w| w[0] <= w[1]), "{steady:?}");
    assert!(blocks(&STARTUP).iter().all(|&b| b == 50));
    // The late leak's history starts when it first holds a block: halfway.
    let late_start = LATE.site(r)["history"][0]["t_s"].as_f64().unwrap();
    let steady_start = STEADY.site(r)["history"][0]["t_s"].as_f64().unwrap();
    assert!(late_start > steady_start, "{late_start} vs {steady_start}");
}

#[test]
fn fail_on_leak_exits_3_after_writing_the_report() {
    let run = long_run();
    run.assert_exit(3);
    assert!(
        run.stderr
            .contains("memtrace: 3 sites got the leak verdict: exit status 3 (--fail-on-leak)"),
        "{}",
        run.stderr
    );
    assert_eq!(run.report.target()["exit_status"], 0);
    assert_eq!(
        run.fixture_tally().expect("done line").get("mapped"),
        LONG_TICKS
    );
    // The two heap leaks, and grow_rss's mmap of every tick: a mapping site.
    assert_eq!(run.report.0["verdicts"]["leak"], 2);
    let mapped: Vec<&serde_json::Value> = run.report.0["resources"]["mappings"]["sites"]
        .as_array()
        .expect("mapping sites")
        .iter()
        .filter(|s| s["verdict"] == "leak")
        .collect();
    assert_eq!(mapped.len(), 1, "{mapped:?}");
    assert_eq!(mapped[0]["kind"], "anon_mapping");
    assert_eq!(mapped[0]["outstanding"], LONG_TICKS);
    assert_eq!(mapped[0]["bytes"], LONG_TICKS * (64 << 10));
    assert!(
        mapped[0]["frames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["function"] == "grow_rss"),
        "{:?}",
        mapped[0]
    );
}

#[test]
fn a_failing_program_keeps_its_exit_status_over_fail_on_leak() {
    let run = short_run();
    run.assert_exit(5);
    assert_eq!(
        run.report.0["verdicts"]["leak"],
        2,
        "{}",
        run.report.summary()
    );
    assert!(
        run.stderr.contains("the program exited with status 5"),
        "{}",
        run.stderr
    );
}

#[test]
fn attach_mode_text_report_leads_with_the_leaks_and_exits_3() {
    let run = attach_text_run();
    let out = &run.out;
    assert_eq!(
        out.code(),
        Some(3),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    if let Err(e) = &run.unharmed {
        panic!("the target did not run on unharmed: {e}");
    }
    let text = &out.stdout;
    assert!(
        text.contains("verdicts: 2 leak, 0 growing, 2 stable, 1 transient, 0 unknown"),
        "{text}"
    );
    assert!(
        text.contains("LEAKS: 2 sites keep growing and hold on to their old blocks"),
        "{text}"
    );
    assert!(
        text.contains("top 5 of 5 sites by outstanding bytes, leaks first:"),
        "{text}"
    );
    // Leaks first, then the others by outstanding bytes, each with its verdict.
    let src = format!("{FIXTURE}.c");
    let order = [
        (&STEADY, "LEAK: +"),
        (&LATE, "LEAK: +"),
        (&STARTUP, "stable: "),
        (&CACHE, "stable: "),
        (&INFLIGHT, "transient: no block older than "),
    ];
    let mut at = 0;
    for (rank, (e, label)) in order.iter().enumerate() {
        let blocks = e.blocks(ATTACH_TICKS);
        let header = format!(
            "#{} {} in {blocks} blocks",
            rank + 1,
            human_bytes(blocks * e.size)
        );
        let frame = format!("{} at {src}:{}", e.function, e.line());
        let h = text[at..]
            .find(&header)
            .unwrap_or_else(|| panic!("no `{header}` after byte {at}:\n{text}"))
            + at;
        let rest = &text[h..];
        let block = &rest[..rest[1..].find("\n#").map_or(rest.len(), |i| i + 1)];
        let lines: Vec<&str> = block.lines().collect();
        assert!(
            lines
                .get(1)
                .is_some_and(|l| l.trim_start().starts_with(label)),
            "{}: the verdict line should start with `{label}`:\n{block}",
            e.function
        );
        assert!(
            block.contains(&frame),
            "{}: no `{frame}` in\n{block}",
            e.function
        );
        at = h + 1;
    }
    assert!(!text.contains("churn"), "{text}");
    // The process view, in attach mode.
    assert!(text.contains("\nprocess: rss "), "{text}");
    assert!(text.contains(", 1 thread"), "{text}");
    assert!(
        text.contains("blocks allocated before memtrace attached are not traced"),
        "{text}"
    );
}

/// `format_bytes` of the report, for the sizes of this fixture.
fn human_bytes(b: u64) -> String {
    if b < 1024 {
        format!("{b} B")
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

// ---- process view and alerts ------------------------------------------------------------

#[test]
fn process_view_explains_rss_outside_the_heap() {
    let run = long_run();
    let p = &run.report.0["process"];
    let samples = p["samples"].as_array().expect("process.samples");
    assert!(samples.len() >= 4, "{p}");
    for s in samples {
        assert_eq!(s["threads"], 1, "{s}");
        assert!(u64_field(s, "rss_bytes") > 0, "{s}");
        assert!(
            u64_field(s, "vm_size_bytes") >= u64_field(s, "rss_bytes"),
            "{s}"
        );
        assert!(u64_field(s, "fds") >= 3, "{s}");
    }
    let t: Vec<f64> = samples.iter().map(|s| s["t_s"].as_f64().unwrap()).collect();
    assert!(t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
    // The fixture maps and touches 64 KiB per tick with mmap: RSS grows, the
    // traced heap explains little of it, and the report says so.
    let s = &p["summary"];
    assert!(
        u64_field(&s["last"], "rss_bytes") > u64_field(&s["first"], "rss_bytes"),
        "{s}"
    );
    let share = s["traced_share_of_rss"].as_f64().unwrap();
    assert!(share > 0.0 && share < 0.25, "{s}");
    let note = s["note"].as_str().expect("a note on RSS growth");
    assert!(note.contains("outside the traced heap"), "{note}");
    // The live summary shows the process too.
    let lines: Vec<&str> = run.stderr.lines().collect();
    let summaries: Vec<usize> = (0..lines.len())
        .filter(|&i| !summary_lines(lines[i]).is_empty())
        .collect();
    assert!(!summaries.is_empty(), "{}", run.stderr);
    for &i in &summaries {
        // The process's figures on the summary's second line, within 100 columns.
        let l = lines.get(i + 1).copied().unwrap_or_default();
        assert!(l.starts_with("  rss ") && l.contains(", 1 thread"), "{l}");
        assert!(lines[i].chars().count() <= 100, "{}", lines[i]);
        assert!(l.chars().count() <= 100, "{l}");
    }
}

fn summary_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            l.strip_prefix("memtrace: ").is_some_and(|r| {
                r.starts_with(|c: char| c.is_ascii_digit()) && r.contains(" outstanding ")
            })
        })
        .collect()
}

#[test]
fn alerts_at_most_once_per_interval() {
    let run = long_run();
    let lines: Vec<&str> = run.stderr.lines().collect();
    let alerts: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("memtrace: ALERT: "))
        .collect();
    assert!(
        !alerts.is_empty(),
        "the leaks grow faster than 1 KiB/s:\n{}",
        run.stderr
    );
    for &i in &alerts {
        assert!(lines[i].contains("(> 1.0 KiB/s)"), "{}", lines[i]);
        assert!(
            lines[i].starts_with("memtrace: ALERT: total outstanding grew ")
                || lines[i].starts_with("memtrace: ALERT: site "),
            "{}",
            lines[i]
        );
        // Each alert follows its interval's summary (a line, then lines
        // indented under it): one per interval at most.
        let head = (0..i).rev().find(|&j| !lines[j].starts_with("  "));
        assert!(
            head.is_some_and(|j| summary_lines(lines[j]).len() == 1),
            "alert not right after a summary line:\n{}",
            run.stderr
        );
    }
}

// ---- snapshots and diffs --------------------------------------------------------------------

/// Writes a report to a fresh file (the harness removed memtrace's).
fn snapshot(r: &Report, shift_addresses: bool) -> PathBuf {
    let mut v = r.0.clone();
    if shift_addresses {
        // Another run, other addresses: the diff must not care.
        for site in v["sites"].as_array_mut().unwrap() {
            for f in site["frames"].as_array_mut().unwrap() {
                let a = u64::from_str_radix(
                    f["address"].as_str().unwrap().trim_start_matches("0x"),
                    16,
                )
                .unwrap();
                f["address"] = Value::String(format!("{:#x}", a ^ 0x7f00_0000_0000));
            }
        }
    }
    let path = unique_path("json");
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    path
}

fn memtrace_out(args: &[&str]) -> Output {
    let mut c = memtrace_command();
    c.args(args);
    run_memtrace(c)
}

#[test]
fn diff_of_two_snapshots_ranks_the_leaks_first() {
    let old = snapshot(&short_run().report, true);
    let new = snapshot(&long_run().report, false);
    let out = memtrace_out(&[
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
        "-f",
        "json",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let d: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", out.stdout));
    assert_eq!(d["schema"], "memtrace-diff/1");
    let sites = d["sites"].as_array().unwrap();
    let got: Vec<(String, String, i64, i64)> = sites
        .iter()
        .map(|s| {
            (
                s["frames"][0]["function"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
                s["status"].as_str().unwrap().to_string(),
                s["size_diff"].as_i64().unwrap(),
                s["count_diff"].as_i64().unwrap(),
            )
        })
        .collect();
    let grew = |e: &Expect| {
        let n = (e.blocks(LONG_TICKS) - e.blocks(SHORT_TICKS)) as i64;
        (
            e.function.to_string(),
            "grew".to_string(),
            n * e.size as i64,
            n,
        )
    };
    let same = |e: &Expect| (e.function.to_string(), "unchanged".to_string(), 0, 0);
    // Matched by stack across two processes: the leaks first, by growth in
    // bytes; the rest unchanged, by size.
    assert_eq!(
        got,
        vec![
            grew(&STEADY),
            grew(&LATE),
            same(&STARTUP),
            same(&CACHE),
            same(&INFLIGHT)
        ],
        "{}",
        out.stdout
    );
    assert_eq!(sites[0]["verdict"], "leak");
    assert_eq!(d["totals"]["grew"], 2);
    assert_eq!(d["totals"]["new"], 0);
    assert_eq!(d["totals"]["vanished"], 0);
    assert_ne!(d["old"]["pid"], d["new"]["pid"]);

    let out = memtrace_out(&[
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
        "-n",
        "1",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let t = &out.stdout;
    assert!(
        t.contains("top 1 of 2 sites that grew or are new, by growth:"),
        "{t}"
    );
    assert!(
        t.contains(
            "#1 +25.0 KiB (+100 blocks): 25.0 KiB in 100 blocks -> 50.0 KiB in 200 blocks [leak, +"
        ),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "steady_leak at {}:{}",
            fixture_source(FIXTURE).display(),
            STEADY.line()
        )),
        "{t}"
    );
    assert!(!t.contains("late_leak"), "-n 1 shows one site:\n{t}");
    assert!(
        t.contains("sites: 2 grew, 0 new, 0 shrank, 0 freed, 0 vanished, 3 unchanged"),
        "{t}"
    );
    // And the other way round, the leaks shrank.
    let out = memtrace_out(&["diff", new.to_str().unwrap(), old.to_str().unwrap()]);
    assert!(out.stdout.contains("no site grew"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("top 2 of 2 sites that shrank, were freed or vanished:"),
        "{}",
        out.stdout
    );
    let _ = std::fs::remove_file(old);
    let _ = std::fs::remove_file(new);
}

#[test]
fn diff_usage_and_input_errors() {
    require_memtrace();
    let good = unique_path("json");
    std::fs::write(&good, r#"{"schema": "memtrace-report/1", "sites": []}"#).unwrap();
    let good = good.to_str().unwrap().to_string();
    let g = good.as_str();
    for args in [
        vec!["diff"],
        vec!["diff", g],
        vec!["diff", g, g, "-f", "xml"],
        vec!["-p", "1", "diff", g, g],
    ] {
        let out = memtrace_out(&args);
        assert_error(&out, 2, &[]);
    }
    let not_json = unique_path("json");
    std::fs::write(&not_json, "memtrace report: pid 1\n").unwrap();
    let a_diff = unique_path("json");
    std::fs::write(&a_diff, r#"{"schema": "memtrace-diff/1", "sites": []}"#).unwrap();
    for (path, says) in [
        (
            "/nonexistent/old.json",
            "cannot read the report /nonexistent/old.json",
        ),
        (not_json.to_str().unwrap(), "is not a JSON report"),
        (a_diff.to_str().unwrap(), "not a memtrace report"),
    ] {
        let out = memtrace_out(&["diff", path, g]);
        assert_error(&out, 1, &[says]);
    }
    let out = memtrace_out(&["diff", g, g]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("no site grew"), "{}", out.stdout);
    let help = memtrace_out(&["--help"]);
    assert_eq!(help.code(), Some(0));
    for usage in [
        "memtrace [OPTIONS] --pid <PID>",
        "memtrace [OPTIONS] -- <CMD> [ARGS]...",
        "memtrace diff [OPTIONS] <OLD.json> <NEW.json>",
        "--fail-on-leak",
        "--alert-growth <RATE>",
    ] {
        assert!(
            help.stdout.contains(usage),
            "no `{usage}` in --help:\n{}",
            help.stdout
        );
    }
    for p in [
        good,
        not_json.display().to_string(),
        a_diff.display().to_string(),
    ] {
        let _ = std::fs::remove_file(p);
    }
}

// ---- realloc growth and peaks ---------------------------------------------------------------

const REALLOC_TICKS: u64 = 150;

/// realloc_growth.c: a buffer grown by realloc each tick moves each time, so
/// no block of its site is ever old; its bytes grow all the same: `growing`,
/// not `transient`. And a site's peak is kept after its blocks are freed.
#[test]
fn a_buffer_grown_by_realloc_is_growing_and_peaks_are_kept() {
    static CELL: OnceLock<Result<Run, String>> = OnceLock::new();
    let run = shared(&CELL, || {
        let bin = build_fixture("realloc_growth", Variant::FramePointers);
        run_launch(
            &["-i", "200ms"],
            &[bin.to_str().unwrap(), "launch", &REALLOC_TICKS.to_string()],
        )
    });
    run.assert_exit(0);
    let r = &run.report;
    let line = |m| source_line("realloc_growth", m);
    let buffer = r.site_at("grow_buffer", line("grow_buffer"));
    assert_eq!(
        (Report::blocks(buffer), Report::bytes(buffer)),
        (1, 512 * REALLOC_TICKS),
        "{}",
        r.summary()
    );
    assert_eq!(
        verdict(buffer),
        "growing",
        "trend {}\n{}",
        buffer["trend"],
        r.summary()
    );
    let hole = r.site_at("hole", line("hole"));
    assert_eq!(Report::bytes(hole), 16 * REALLOC_TICKS, "{}", r.summary());
    assert_eq!(verdict(hole), "leak", "trend {}", hole["trend"]);
    let spike = r.site_at("spike", line("spike"));
    assert_eq!(
        (Report::bytes(spike), spike["peak_bytes"].as_u64()),
        (1000, Some(100 * 1000)),
        "{spike}"
    );
    // The growing buffer's peak is where it ends.
    assert_eq!(buffer["peak_bytes"].as_u64(), Some(512 * REALLOC_TICKS));
    // Ids: 16 hex digits, one per site.
    let ids: std::collections::BTreeSet<&str> = r
        .sites()
        .iter()
        .map(|s| s["site_id"].as_str().expect("a site_id"))
        .collect();
    assert_eq!(ids.len(), r.sites().len(), "{}", r.summary());
    assert!(
        ids.iter()
            .all(|i| i.len() == 16 && i.bytes().all(|b| b.is_ascii_hexdigit()))
    );
}
