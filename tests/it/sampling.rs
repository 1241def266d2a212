//! `--sample-bytes`: estimates scaled back from sampled allocations, checked
//! for bias on a fixture with known totals (tests/fixtures/sampled.c), over
//! repeated runs. With a mean of 64 KiB each large site gets about 600–2,000
//! samples (a standard error of 1–2.5%), so a bound of ±10% per run fails only
//! for a real bias, or a broken sampler.

use memtrace_tests::*;
use serde_json::json;

const MEAN: &str = "64KiB";
const RUNS: usize = 3;

/// (frame 0, its call's marker, outstanding bytes at the end)
const SITES: &[(&str, &str, u64)] = &[
    ("leak_small", "small", 2_000_000 * 64),
    ("leak_medium", "medium", 30_000 * 4096),
    ("leak_large", "large", 600 * 200 * 1024),
    ("grow", "grow_realloc", 20_000 * 6000),
];

/// (report total, fixture tally key) of the calls, counted exactly.
const CALLS: &[(&str, &str)] = &[("alloc_calls", "alloc_calls"), ("free_calls", "free_calls")];

/// Calls are counted whether sampled or not: `(report key, tally key)` exact,
/// and no drop or unknown free (frees of unsampled blocks are expected).
fn check_calls_exact(run: &Run, keys: &[(&str, &str)]) {
    let r = &run.report;
    let tally = run.fixture_tally().expect("the fixture's tally line");
    for &(key, tally_key) in keys {
        assert_eq!(
            r.total(key),
            tally.get(tally_key),
            "totals.{key}\n{}",
            r.summary()
        );
    }
    for key in ["dropped_events", "free_unknown"] {
        assert_eq!(r.total(key), 0, "totals.{key}\n{}", r.summary());
    }
}

/// Each large site's estimated outstanding bytes within ±10% of the truth;
/// returns them in `SITES` order.
fn check_site_estimates(r: &Report, what: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for &(function, marker, bytes) in SITES {
        let line = source_line("sampled", marker);
        let sites = r.sites_at(function, line);
        assert_eq!(sites.len(), 1, "{function}:{line}\n{}", r.summary());
        let got = u64_field(sites[0], "outstanding_bytes");
        let err = got as f64 / bytes as f64 - 1.0;
        assert!(
            err.abs() < 0.10,
            "{what}: {function}:{line} estimated {got} bytes outstanding, \
             {bytes} in truth ({:+.1}%)\n{}",
            err * 100.0,
            r.summary()
        );
        out.push(got as f64);
    }
    out
}

#[test]
fn sampled_estimates_are_unbiased() {
    require_root();
    require_memtrace();
    let bin = build_fixture("sampled", Variant::FramePointers);
    let mut estimates = vec![Vec::new(); SITES.len()];
    for run_no in 0..RUNS {
        let run = run_launch(&["--sample-bytes", MEAN], &[bin.to_str().unwrap()]);
        run.assert_exit(0);
        let r = &run.report;
        assert_eq!(
            r.0["sampling"],
            json!({"mode": "bytes", "mean_bytes": 65536}),
            "{}",
            r.summary()
        );
        check_calls_exact(&run, CALLS);
        // Unsampled calls pay no return probe: about one call in a hundred
        // here is sampled (each malloc(64) with probability 1/1000).
        let returns = u64_field(&r.0["allocator"], "return_probes");
        assert!(
            returns > 0 && returns * 20 < r.total("alloc_calls"),
            "{} return probes for {} calls\n{}",
            returns,
            r.total("alloc_calls"),
            r.0["allocator"]
        );
        let run_estimates = check_site_estimates(r, &format!("run {run_no}"));
        for (est, got) in estimates.iter_mut().zip(run_estimates) {
            est.push(got);
        }
        // Freed blocks (and the blocks realloc moved) are not outstanding.
        for (function, marker) in [("churn", "churn"), ("grow", "grow_first")] {
            let line = source_line("sampled", marker);
            assert!(
                r.sites_at(function, line).is_empty(),
                "{function}:{line} freed all it allocated\n{}",
                r.summary()
            );
        }
        let total: u64 = SITES.iter().map(|s| s.2).sum();
        let got = r.total("outstanding_bytes");
        assert!(
            (got as f64 / total as f64 - 1.0).abs() < 0.10,
            "totals.outstanding_bytes {got} vs {total}\n{}",
            r.summary()
        );
    }
    // Over the runs the mean comes closer.
    for (est, &(function, _, bytes)) in estimates.iter().zip(SITES) {
        let mean = est.iter().sum::<f64>() / est.len() as f64;
        assert!(
            (mean / bytes as f64 - 1.0).abs() < 0.06,
            "{function}: mean estimate over {RUNS} runs {mean:.0} vs {bytes} ({est:?})"
        );
    }
}

/// Calls told by their return address, with nothing marking the
/// allocator's own calls: classic probes (kernels without uprobe sessions,
/// where every return probe runs) or `MEMTRACE_OWN_CALLS=return-address`. An
/// unsampled tail call (realloc(NULL) jumping to malloc, aligned_alloc
/// reaching it through _mid_memalign) is still one call, and the estimates are
/// as good.
fn check_sampled_by_return_address(env: (&str, &str), mechanism: &str) {
    require_root();
    require_memtrace();
    let bin = build_fixture("sampled", Variant::FramePointers);
    let run = run_launch_env(&["--sample-bytes", MEAN], &[bin.to_str().unwrap()], &[env]);
    run.assert_exit(0);
    let r = &run.report;
    let allocator = &r.0["allocator"];
    assert_eq!(
        allocator["probe_mechanism"].as_str(),
        Some(mechanism),
        "{allocator}"
    );
    assert_eq!(
        allocator["own_calls_told_by"].as_str(),
        Some("return address"),
        "{allocator}"
    );
    check_calls_exact(&run, CALLS);
    check_site_estimates(r, mechanism);
}

#[test]
fn sampled_classic_probes_count_tail_calls_once() {
    check_sampled_by_return_address(("MEMTRACE_PROBES", "classic"), "uprobe");
}

#[test]
fn sampled_session_by_return_address_counts_tail_calls_once() {
    check_sampled_by_return_address(("MEMTRACE_OWN_CALLS", "return-address"), "uprobe-session");
}

/// With sampling, calls are counted exactly all the same, on leaks.c's
/// every kind of call: realloc(p, 0) is a free (glibc returns NULL), and
/// posix_memalign with alignment 3 fails (EINVAL); both are almost never
/// sampled at 1 GiB, so their returns are seen for them alone. (Its other
/// failures ask for about 2^64 bytes: always sampled.)
#[test]
fn sampled_calls_are_counted_exactly() {
    require_root();
    require_memtrace();
    let bin = build_fixture("leaks", Variant::FramePointers);
    let run = run_launch(
        &["--sample-bytes", "1GiB"],
        &[bin.to_str().unwrap(), "launch", "0"],
    );
    run.assert_exit(0);
    check_calls_exact(
        &run,
        &[
            ("alloc_calls", "alloc_calls"),
            ("free_calls", "free_calls"),
            ("failed_allocs", "failed"),
        ],
    );
}
