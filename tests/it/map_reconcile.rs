//! Mapping ranges corrected after lost events: a burst of mmap/munmap
//! pairs far beyond the event buffer, then the ranges made to agree with
//! /proc/PID/maps, every correction counted.

use memtrace_common::mappings::MAP_EVENTS_BYTES;
use memtrace_tests::*;
use serde_json::{Value, json};

/// No interval ends during the fixture's work: nothing drains the event
/// buffer before the report, so what it held and what was lost is known.
const ARGS: &[&str] = &["--interval", "1h"];

/// Bytes of one event in the buffer: the 80-byte `MapEvent` and the ring's
/// 8-byte header.
const EVENT_BYTES: u64 = 88;

#[test]
fn ranges_are_corrected_from_proc_maps_after_lost_events() {
    require_root();
    let bin = build_fixture("map_burst", Variant::FramePointers);
    // Enough empty munmaps to fill the buffer after the fixture's first
    // mappings, whatever its size.
    let filler = (MAP_EVENTS_BYTES as u64).div_ceil(EVENT_BYTES) + 1000;
    let mut target = TestProcess::spawn_ready(&bin, &[&filler.to_string()]);
    let session = attach(&target, ARGS);
    target.go();
    let tally = target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let m = &run.report.0["resources"]["mappings"];
    assert!(m.is_object(), "no resources.mappings:\n{}", run.report.0);
    let e = &m["events"];
    assert_eq!(e["mmap"], tally.get("mmap"), "{e}");
    assert_eq!(e["munmap"], tally.get("munmap"), "{e}");
    // The buffer held the first mappings and part of the filler; the burst
    // and all that followed were lost.
    let received = MAP_EVENTS_BYTES as u64 / EVENT_BYTES;
    assert_eq!(
        u64_field(e, "lost"),
        tally.get("mmap") + tally.get("munmap") - received,
        "{e}"
    );
    // Corrected: the mappings whose munmap was lost are released; those
    // whose mmap was lost are added, without a stack.
    assert_eq!(
        m["reconciliation"],
        json!({
            "scans": 1,
            "released": { "mappings": tally.get("released"), "bytes": tally.get("released_bytes") },
            "seen": { "mappings": tally.get("kept"), "bytes": tally.get("kept_bytes") },
        }),
        "{m}"
    );
    let seen = &m["seen_at_reconciliation"];
    assert_eq!(
        seen["by_kind"],
        json!({ "anon": {
            "mappings": tally.get("kept"), "bytes": tally.get("kept_bytes"), "released_bytes": 0 } }),
        "{seen}"
    );
    // No site holds a range: the released mappings' site has none left,
    // the burst's were never seen.
    assert_eq!(m["sites"], json!([]), "{m}");
    assert_eq!(m["bytes"], 0, "{m}");
    target.finish_unharmed();
    let _: &Value = m;
}
