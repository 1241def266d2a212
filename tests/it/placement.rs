//! Probes placed past a function's first instruction (glibc's free at its
//! `je`, the aligned allocators after their `cmpb`) fire exactly once per call:
//! the totals of a run over a fixture that calls every entry point a known
//! number of times are exact, and free(NULL), which also reaches free's probe,
//! is not counted.

use memtrace_tests::*;

/// tests/fixtures/placement.c's calls: 11 + 12 + ... + 19 blocks, each freed,
/// and one block grown by realloc 5 times (each an allocation and a free).
const BLOCKS: u64 = 11 + 12 + 13 + 14 + 15 + 16 + 17 + 18 + 19;
const REGROW: u64 = 5;

#[test]
fn probe_sites_fire_once_per_call_and_free_null_is_ignored() {
    require_root();
    require_memtrace();
    let bin = build_fixture("placement", Variant::FramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let libc = r.0["allocator"]["module"].as_str().unwrap_or("");
    assert!(libc.contains("libc.so"), "traced allocator: {libc}");
    assert_eq!(
        r.total("alloc_calls"),
        BLOCKS + 1 + REGROW,
        "{}",
        r.summary()
    );
    assert_eq!(
        r.total("free_calls"),
        BLOCKS + REGROW + 1,
        "{}",
        r.summary()
    );
    assert_eq!(r.total("outstanding_blocks"), 0, "{}", r.summary());
    assert_eq!(r.total("free_unknown"), 0, "{}", r.summary());
    assert_eq!(r.total("failed_allocs"), 0, "{}", r.summary());
    assert_eq!(r.total("dropped_events"), 0, "{}", r.summary());
}
