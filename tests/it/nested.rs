//! Allocator calls that nest on one thread: a signal handler that allocates
//! while malloc is in flight, and an allocator that calls itself. Each user call
//! is recorded once, with its own size.

use memtrace_tests::*;

#[test]
fn nested_and_recursive_calls_keep_their_own_state() {
    require_root();
    require_memtrace();
    let bin = build_fixture("nested_alloc", Variant::FramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    assert_eq!(
        r.0["allocator"]["module"].as_str(),
        bin.to_str(),
        "the executable's own allocator wins over libc's"
    );
    let outer = source_line("nested_alloc", "outer");
    let handler = source_line("nested_alloc", "handler");
    let recursive = source_line("nested_alloc", "recursive");
    r.assert_outstanding(&[At("outer", Some(outer)), At("main", None)], 7, 7 * 4242);
    r.assert_outstanding(&[At("on_usr1", Some(handler))], 7, 7 * 48);
    r.assert_outstanding(&[At("main", Some(recursive))], 3, 3 * 5000);
    assert_eq!(r.total("outstanding_blocks"), 17, "{}", r.summary());
    assert_eq!(
        r.total("outstanding_bytes"),
        7 * 4242 + 7 * 48 + 3 * 5000,
        "{}",
        r.summary()
    );
    assert_eq!(r.total("alloc_calls"), 17, "{}", r.summary());
    assert_eq!(r.total("allocator_internal_calls"), 3, "{}", r.summary());
    // The recursive calls' returns are skipped: one return probe per user call.
    assert_eq!(
        u64_field(&r.0["allocator"], "return_probes"),
        17,
        "{}",
        r.0["allocator"]
    );
    assert_eq!(r.total("dropped_events"), 0, "{}", r.summary());
    assert_eq!(r.total("stack_errors"), 0, "{}", r.summary());
}
