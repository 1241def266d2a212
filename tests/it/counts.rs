//! Counts that must not mislead, and stacks another tracer's probes must not
//! spoil (issue 22, parts 5 and 6): a return probe pending on malloc's frame
//! (here another memtrace's, sampling the same process) must not become a
//! frame; frees made while the probes are being removed, and the frees glibc
//! makes of its thread caches, are not frees of blocks allocated before
//! memtrace attached; a site whose blocks were dropped gets no verdict the
//! data cannot support, and the process note names the drops.

use std::thread;
use std::time::Duration;

use serde_json::Value;

use memtrace_tests::*;

/// The uretprobe trampoline's page: `TASK_SIZE - PAGE_SIZE`, where the
/// kernel maps `[uprobes]` (the bogus frame of the issue was its first word).
const URETPROBE_PAGE: u64 = 0x7fff_ffff_e000;

fn address(f: &Frame) -> u64 {
    f.address
        .as_deref()
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0)
}

#[test]
fn another_tracers_return_probe_is_not_a_frame() {
    require_root();
    require_memtrace();
    let bin = build_fixture("verdicts", Variant::FramePointers);
    let mut target = TestProcess::spawn_ready(&bin, &["attach", "100"]);
    // memtrace reads malloc's result inside it (result sites); a second one,
    // sampling, probes malloc's entry with a uprobe session, which keeps most
    // calls' returns: malloc's return address on the stack is then the
    // trampoline while the call runs.
    let exact = attach(&target, &[]);
    let sampling = attach(&target, &["--sample-bytes", "64"]);
    target.go();
    let tally = target.wait_done();
    let sampled = sampling.stop(libc::SIGINT);
    let run = exact.stop(libc::SIGINT);
    let r = &run.report;
    for s in r.sites() {
        for f in Report::frames(s) {
            let a = address(&f);
            assert!(
                !(URETPROBE_PAGE..URETPROBE_PAGE + 4096).contains(&a) && f.module.is_some(),
                "a frame that is no code: {f:?}\n{}",
                r.summary()
            );
        }
    }
    // Every one of steady_leak's blocks, at its own stack, none lost.
    let line = source_line("verdicts", "steady_leak");
    r.assert_outstanding(&[At("steady_leak", Some(line))], 100, 100 * 256);
    assert_eq!(r.total("stack_errors"), 0, "{}", r.summary());
    assert_eq!(
        r.total("alloc_calls"),
        tally.get("alloc_calls"),
        "{}",
        r.summary()
    );
    // The trampoline was met, and replaced by the real return address.
    assert!(
        u64_field(&r.0["drops"], "unwind_uretprobe_frames") > 0,
        "{}",
        r.0["drops"]
    );
    assert_eq!(r.0["drops"]["unwind_uretprobe_unresolved"], 0);
    assert_eq!(sampled.report.total("stack_errors"), 0);
    target.finish_unharmed();
}

#[test]
fn frees_while_the_probes_are_removed_are_not_counted() {
    require_root();
    require_memtrace();
    let bin = build_fixture("churn", Variant::FramePointers);
    let mut target = TestProcess::spawn_ready(&bin, &[]);
    let session = attach(&target, &[]);
    target.go();
    let tally = target.wait_done();
    // The fixture churns on at full speed while memtrace ends tracing and
    // removes its probes, one link after the other.
    thread::sleep(Duration::from_millis(200));
    let run = session.stop(libc::SIGINT);
    let r = &run.report;
    // Nothing was allocated before memtrace attached and freed since: the
    // fixture was idle until "go".
    assert_eq!(r.total("free_unknown"), 0, "{}", r.summary());
    assert_eq!(r.total("dropped_events"), 0, "{}", r.summary());
    // Only the kept blocks are outstanding, and at most the one churned block
    // that was between its malloc and its free when tracing ended: no
    // churned block lost its free.
    r.assert_outstanding(
        &[
            At("keep", Some(source_line("churn", "kept"))),
            At("main", None),
        ],
        16,
        16 * 40,
    );
    let outstanding = r.total("outstanding_blocks");
    assert!((16..=17).contains(&outstanding), "{}", r.summary());
    assert!(r.total("alloc_calls") >= tally.get("alloc_calls"));
    assert_eq!(
        r.total("alloc_calls") - outstanding,
        r.total("free_calls"),
        "every churned block's free was seen: {}",
        r.summary()
    );
    target.finish_unharmed();
}

#[test]
fn frees_of_glibcs_thread_caches_are_the_allocators() {
    require_root();
    require_memtrace();
    let bin = build_fixture("thread_exit", Variant::FramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let tally = run.fixture_tally().expect("the fixture's done line");
    // In launch mode memtrace sees every allocation: each thread's exit
    // hands its tcache (blocks the program freed, and the cache itself)
    // back to the heap; those frees are the allocator's own, counted apart.
    assert_eq!(r.total("free_unknown"), 0, "{}", r.summary());
    assert!(
        r.total("allocator_own_frees") >= 8,
        "one tcache per thread at least: {}",
        r.summary()
    );
    assert!(r.total("free_calls") >= tally.get("free_calls"));
    r.assert_outstanding(
        &[At("worker", Some(source_line("thread_exit", "kept")))],
        8,
        8 * 64,
    );
}

#[test]
fn a_site_that_lost_blocks_to_a_full_table_gets_no_verdict_they_contradict() {
    require_root();
    require_memtrace();
    let bin = build_fixture("verdicts", Variant::FramePointers);
    // A table of 80 slots: full within the first ticks, after which
    // steady_leak's new blocks are dropped and what it holds stays flat.
    let run = run_launch(
        &["-i", "200ms", "--max-blocks", "64"],
        &[bin.to_str().unwrap(), "launch", "200"],
    );
    run.assert_exit(0);
    let r = &run.report;
    let dropped = r.0["drops"]["alloc_map_full"].as_u64().unwrap_or(0);
    assert!(dropped > 0, "{}", r.0["drops"]);
    let dropped_of = |s: &Value| s.get("dropped_blocks").and_then(Value::as_u64);
    for s in r.sites() {
        if dropped_of(s).unwrap_or(0) > 0 {
            let v = s["verdict"].as_str().unwrap_or("");
            assert!(
                v != "stable" && v != "transient",
                "a site that lost blocks is called {v}: {}",
                r.summary()
            );
        }
    }
    let leak = r.site_at("steady_leak", source_line("verdicts", "steady_leak"));
    assert!(dropped_of(leak).unwrap_or(0) > 0, "{leak}");
    assert_eq!(leak["verdict"], "unknown", "{}", r.summary());
    assert!(dropped_of(leak).unwrap() <= dropped);
    // RSS grows (the fixture maps memory every tick); the note names the
    // allocations memtrace had no room for instead of sending the reader
    // outside the heap.
    let note = r.0["process"]["summary"]["note"]
        .as_str()
        .unwrap_or_else(|| panic!("a note on RSS growth: {}", r.0["process"]["summary"]));
    assert!(note.contains("were not recorded"), "{note}");
    assert!(note.contains("--max-blocks"), "{note}");
    assert!(!note.contains("outside the traced heap"), "{note}");
}
