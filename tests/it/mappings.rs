//! Memory mappings: anonymous and file mmaps with their creating stacks, a
//! range unmapped in pieces, mremap grow and move, MAP_FIXED over part of
//! a range, balanced churn never reported, malloc's own mmaps counted as
//! heap only, a thread's stack counted apart, and what existed at attach.

use memtrace_tests::*;
use serde_json::Value;

fn maps_bin() -> std::path::PathBuf {
    build_fixture("maps", Variant::FramePointers)
}

/// Samples often enough for the fixture's 16 rounds of 50 ms to make a history.
const ARGS: &[&str] = &["--interval", "100ms"];

const PAGE: u64 = 4096;
const ROUNDS: u64 = 16;

fn mappings(r: &Report) -> &Value {
    let m = &r.0["resources"]["mappings"];
    assert!(
        m.is_object(),
        "no resources.mappings in the report:\n{}",
        r.0
    );
    m
}

fn map_sites(r: &Report) -> &[Value] {
    mappings(r)["sites"]
        .as_array()
        .expect("resources.mappings.sites")
}

/// The mapping sites whose stack holds `function`.
fn sites_of<'a>(r: &'a Report, function: &str) -> Vec<&'a Value> {
    map_sites(r)
        .iter()
        .filter(|s| {
            Report::frames(s)
                .iter()
                .any(|f| f.function.as_deref() == Some(function))
        })
        .collect()
}

fn describe(r: &Report) -> String {
    map_sites(r)
        .iter()
        .map(|s| {
            let frames: Vec<String> = Report::frames(s)
                .iter()
                .take(4)
                .map(|f| f.function().to_string())
                .collect();
            format!(
                "  {} {} {} bytes {} ({}) < {}\n",
                s["outstanding"],
                s["kind"],
                s["verdict"],
                s["bytes"],
                s["description"],
                frames.join(" < ")
            )
        })
        .collect()
}

/// The one site of `function`: (mappings, bytes).
fn site<'a>(r: &'a Report, function: &str) -> &'a Value {
    let found = sites_of(r, function);
    assert_eq!(
        found.len(),
        1,
        "mapping sites of {function}:\n{}",
        describe(r)
    );
    found[0]
}

fn counts(r: &Report, function: &str) -> (u64, u64) {
    let s = site(r, function);
    (u64_field(s, "outstanding"), u64_field(s, "bytes"))
}

/// What every run of the fixture holds, launch or attach.
fn assert_kept_sites(r: &Report) {
    let d = || describe(r);
    assert_eq!(
        counts(r, "leak_anon"),
        (ROUNDS, ROUNDS * 64 * 1024),
        "{}",
        d()
    );
    assert_eq!(counts(r, "leak_file"), (ROUNDS, ROUNDS * PAGE), "{}", d());
    assert_eq!(counts(r, "in_pieces"), (1, 10 * PAGE), "{}", d());
    assert_eq!(counts(r, "remap_grow"), (1, 8 * PAGE), "{}", d());
    assert_eq!(counts(r, "reserve_space"), (1, 6 * PAGE), "{}", d());
    assert_eq!(counts(r, "remap_move"), (1, 2 * PAGE), "{}", d());
    assert_eq!(counts(r, "fixed_base"), (1, 6 * PAGE), "{}", d());
    assert_eq!(counts(r, "fixed_over"), (1, 2 * PAGE), "{}", d());
    // in_pieces: what is left of it, in 3 ranges.
    assert_eq!(site(r, "in_pieces")["ranges"].as_array().unwrap().len(), 3);
    let anon = site(r, "leak_anon");
    assert_eq!(anon["kind"], "anon_mapping");
    assert_eq!(anon["shared"], false);
    assert_eq!(anon["verdict"], "leak", "{}", d());
    assert_eq!(u64_field(anon, "created"), ROUNDS);
    let file = site(r, "leak_file");
    assert_eq!(file["kind"], "file_mapping");
    assert_eq!(file["description"], maps_bin().display().to_string());
    assert_eq!(file["verdict"], "leak", "{}", d());
    for function in ["leak_anon", "leak_file", "in_pieces", "fixed_over"] {
        let s = site(r, function);
        assert_eq!(s["stack_captured"], true, "{function}");
        // Through the libc wrapper to its caller, and on to main.
        let names: Vec<String> = Report::frames(s)
            .iter()
            .map(|f| f.function().to_string())
            .collect();
        assert!(names.iter().any(|n| n == "main"), "{function}: {names:?}");
    }
    // Churn is never reported; malloc's own mappings and the thread's stack
    // are never mapping sites.
    for function in [
        "churn_maps",
        "large_malloc",
        "malloc",
        "start_thread",
        "pthread_create",
    ] {
        assert!(sites_of(r, function).is_empty(), "{function}:\n{}", d());
    }
    // Every traced site is one of the above.
    assert_eq!(map_sites(r).len(), 8, "{}", d());
    let m = mappings(r);
    // malloc(1 MiB) kept ROUNDS times: glibc maps each (1 MiB and its
    // header, rounded to pages), for the heap.
    assert_eq!(u64_field(&m["allocator"], "outstanding"), ROUNDS, "{m}");
    assert_eq!(
        u64_field(&m["allocator"], "bytes"),
        ROUNDS * ((1 << 20) + PAGE),
        "{m}"
    );
    // The joined thread's stack stays in glibc's cache.
    assert_eq!(u64_field(&m["thread_stacks"], "outstanding"), 1, "{m}");
    assert_eq!(m["events"]["lost"], 0, "{m}");
    assert_eq!(m["events"]["regs_read_errors"], 0, "{m}");
    assert_eq!(m["verdicts"]["leak"], 2, "{}", d());
    // The large blocks are heap blocks, counted there once.
    let heap: u64 = r
        .sites_containing("large_malloc")
        .iter()
        .map(|s| Report::blocks(s))
        .sum();
    assert_eq!(heap, ROUNDS, "{}", r.summary());
}

#[test]
fn launch_traces_mappings_as_ranges() {
    require_root();
    let bin = maps_bin();
    let mut args = ARGS.to_vec();
    args.push("--fail-on-leak");
    let run = run_launch(&args, &[bin.to_str().unwrap(), "launch"]);
    let r = &run.report;
    assert_kept_sites(r);
    // The leaks found are the mappings' and the heap's large blocks.
    run.assert_exit(3);
    // The program's own file, the loader, its stack...: existed at exec.
    let e = &mappings(r)["existed_at_attach"];
    assert!(u64_field(&e["by_kind"]["file"], "mappings") >= 1, "{e}");
    // The text report's part.
    assert!(
        run.stdout.is_empty() || !run.stdout.contains("MAPPINGS: 0"),
        "{}",
        run.stdout
    );
}

#[test]
fn attach_lists_what_existed_and_counts_its_unmapping_apart() {
    require_root();
    let mut target = TestProcess::spawn_ready(&maps_bin(), &["attach"]);
    let session = attach(&target, ARGS);
    target.go();
    target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let r = &run.report;
    assert_kept_sites(r);
    let m = mappings(r);
    let e = &m["existed_at_attach"];
    assert!(u64_field(&e["by_kind"]["anon"], "mappings") >= 1, "{e}");
    // The 3 pages mapped before attach, unmapped while traced: counted
    // apart, never as a site's.
    assert_eq!(u64_field(e, "released_bytes"), 3 * PAGE, "{e}");
    assert_eq!(
        u64_field(&e["by_kind"]["anon"], "released_bytes"),
        3 * PAGE,
        "{e}"
    );
    assert_eq!(m["events"]["unmapped_unknown_bytes"], 0, "{m}");
    target.finish_unharmed();
}
