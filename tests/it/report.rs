//! What the report shows: leak candidates by age, and the text rendering.

use memtrace_tests::*;

#[test]
fn min_age_keeps_only_old_blocks_as_candidates() {
    require_root();
    require_memtrace();
    let bin = build_fixture("aged", Variant::FramePointers);
    let run = run_launch(&["--min-age", "1s"], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    assert_old_blocks_only(&run.report);
    assert_eq!(run.report.0["ages_from"], "blocks");
}

/// aged.c under `--min-age 1s`: only the 2 s old blocks are candidates.
fn assert_old_blocks_only(r: &Report) {
    let old = source_line("aged", "old_leak");
    r.assert_outstanding(&[At("old_leak", Some(old)), At("main", None)], 5, 500);
    assert!(
        r.sites_containing("young_leak").is_empty(),
        "young blocks are not leak candidates:\n{}",
        r.summary()
    );
    let age = r.site_at("old_leak", old)["oldest_age_s"].as_f64().unwrap();
    assert!(age >= 1.9, "oldest_age_s {age}: the blocks are 2 s old");
    // Totals still count every outstanding block.
    assert_eq!(r.total("outstanding_blocks"), 8, "{}", r.summary());
    assert_eq!(r.total("outstanding_bytes"), 500 + 600, "{}", r.summary());
    assert_eq!(r.0["min_age_s"].as_f64(), Some(1.0));
}

/// The same with ages from the kernel's per-epoch aggregates (what memtrace
/// uses above 100,000 blocks): the whole run is one epoch here, and each
/// site's aggregate has its own mean birth, so the old blocks are still told
/// from the young ones.
#[test]
fn min_age_with_ages_from_epoch_aggregates() {
    require_root();
    require_memtrace();
    let bin = build_fixture("aged", Variant::FramePointers);
    let run = run_launch_env(
        &["--min-age", "1s"],
        &[bin.to_str().unwrap()],
        &[("MEMTRACE_AGES", "epochs")],
    );
    run.assert_exit(0);
    let r = &run.report;
    assert_eq!(r.0["ages_from"], "epochs", "{}", r.summary());
    assert_old_blocks_only(r);

    // The text report says so, and shows the top site's stack.
    let out = run_memtrace({
        let mut c = memtrace_command();
        c.env("MEMTRACE_AGES", "epochs")
            .args(["-n", "1", "--"])
            .arg(&bin);
        c
    });
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
    let text = &out.stdout;
    assert!(
        text.contains("ages: the report's and the history's from per-interval aggregates"),
        "{text}"
    );
    assert!(text.contains("#1 600 B in 3 blocks"), "{text}");
    assert!(
        text.contains(&format!(
            "▸ young_leak at aged.c:{}\n",
            source_line("aged", "young_leak")
        )),
        "{text}"
    );
}

#[test]
fn text_report_shows_the_top_sites_with_their_stacks() {
    require_root();
    require_memtrace();
    let bin = build_fixture("aged", Variant::FramePointers);
    let out = run_memtrace({
        let mut c = memtrace_command();
        c.args(["-n", "1", "--"]).arg(&bin);
        c
    });
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
    let text = &out.stdout;
    let young = source_line("aged", "young_leak");
    let old = source_line("aged", "old_leak");
    assert!(text.contains("outstanding: 1.1 KiB in 8 blocks"), "{text}");
    assert!(text.contains("nothing dropped"), "{text}");
    assert!(
        text.contains("top 1 of 2 sites by outstanding bytes"),
        "{text}"
    );
    assert!(text.contains("#1 600 B in 3 blocks"), "{text}");
    // The program's own frames, marked, with the file's name only; the
    // process start folded.
    assert!(
        text.contains(&format!("    ▸ young_leak at aged.c:{young}\n")),
        "{text}"
    );
    assert!(text.contains("      … 3 process start frames\n"), "{text}");
    assert!(!text.contains("0x0000"), "no address without -v:\n{text}");
    assert!(
        !text.contains(&format!(":{old}\n")),
        "only the top site is shown:\n{text}"
    );
    assert!(text.contains("... and 1 more site holding 500 B"), "{text}");
    // Not a terminal: no colour.
    assert!(!text.contains('\x1b'), "{text}");

    // -v: every frame, with its address and full path.
    let out = run_memtrace({
        let mut c = memtrace_command();
        c.args(["-v", "-n", "1", "--"]).arg(&bin);
        c
    });
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
    let text = &out.stdout;
    let frame = format!(
        " young_leak at {}:{young}\n",
        fixture_source("aged").display()
    );
    let line = text
        .lines()
        .find(|l| format!("{l}\n").ends_with(&frame))
        .unwrap_or_else(|| panic!("no `{frame}` in\n{text}"));
    assert!(line.starts_with("    ▸ 0x"), "{line}");
    assert!(text.contains(" _start in "), "{text}");
    assert!(!text.contains("process start frames"), "{text}");
}

/// The lines of the text report's site whose header starts `header`: the
/// header, the verdict, then its stack.
fn site_lines<'t>(text: &'t str, header: &str) -> Vec<&'t str> {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with('#') && l.contains(header))
        .unwrap_or_else(|| panic!("no site `{header}` in\n{text}"));
    lines[at..]
        .iter()
        .take_while(|l| !l.is_empty())
        .copied()
        .collect()
}

#[test]
fn a_cpp_leak_reads_from_the_programs_own_function() {
    require_root();
    require_memtrace();
    let bin = build_fixture("std_leaks", Variant::FramePointers);
    let out = run_memtrace({
        let mut c = memtrace_command();
        c.args(["-n", "20", "--"]).arg(&bin);
        c
    });
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
    let text = &out.stdout;
    let line = |m| source_line("std_leaks", m);
    // std::vector<int>::reserve (inlined from the system's headers) and
    // operator new fold into one line, under the program's function.
    let vector = site_lines(text, " 3.9 KiB in 1 block (");
    assert_eq!(
        vector[2..],
        [
            format!(
                "    ▸ app::grow_vector() at std_leaks.cpp:{}",
                line("std_reserve")
            ),
            "      … allocated through operator new(unsigned long) (5 frames)".to_string(),
            format!("    ▸ main at std_leaks.cpp:{}", line("call_grow_vector")),
            "      … 3 process start frames".to_string(),
        ],
        "{text}"
    );
    let strings = site_lines(text, " 505 B in 5 blocks (");
    assert_eq!(
        strings[2],
        format!(
            "    ▸ app::make_string[abi:cxx11](char) at std_leaks.cpp:{}",
            line("std_string")
        ),
        "{text}"
    );
    assert!(
        strings[3].starts_with("      … allocated through operator new(unsigned long) ("),
        "{text}"
    );
}

#[test]
fn a_c_stack_ends_with_main_and_the_process_start_folded() {
    require_root();
    require_memtrace();
    let bin = build_fixture("leaks", Variant::FramePointers);
    let out = run_memtrace({
        let mut c = memtrace_command();
        c.args(["-n", "100", "--"]).arg(&bin).args(["launch", "0"]);
        c
    });
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
    let text = &out.stdout;
    let calloc = site_lines(text, " 4.9 KiB in 5 blocks (");
    assert_eq!(
        calloc[2..],
        [
            format!(
                "    ▸ leak_calloc at leaks.c:{}",
                source_line("leaks", "calloc")
            ),
            format!(
                "    ▸ run_leaks at leaks.c:{}",
                source_line("leaks", "call_leak_calloc")
            ),
            format!(
                "    ▸ main at leaks.c:{}",
                source_line("leaks", "call_run_leaks")
            ),
            "      … 3 process start frames".to_string(),
        ],
        "{text}"
    );
    for l in text.lines() {
        assert!(
            !(l.contains("__libc_start_") || l.ends_with("_start") || l.contains(" _start ")),
            "a process start frame shown: {l}\n{text}"
        );
    }
}

#[test]
fn a_full_block_map_is_counted_never_silent() {
    require_root();
    require_memtrace();
    let bin = build_fixture("many_blocks", Variant::FramePointers);
    let run = run_launch(&["--max-blocks", "50"], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    // --max-blocks 50 makes a table of 10 buckets of 8 slots: room for at
    // least the 50 asked for, and for at most 80. Whatever does not fit of
    // the 150 blocks is counted, one by one.
    let kept = r.total("outstanding_blocks");
    let slots = memtrace_common::alloc_buckets(50) as u64 * 8;
    assert_eq!(slots, 80);
    assert!((50..=slots).contains(&kept), "{}", r.summary());
    assert_eq!(kept + r.total("dropped_events"), 150, "{}", r.summary());
    assert_eq!(
        r.0["drops"]["alloc_map_full"],
        150 - kept,
        "{}",
        r.0["drops"]
    );
    assert_eq!(r.total("alloc_calls"), kept, "{}", r.summary());
    r.assert_outstanding(
        &[At("main", Some(source_line("many_blocks", "many")))],
        kept,
        kept * 10,
    );
}

#[test]
fn map_sizes_are_checked() {
    let out = run_memtrace({
        let mut c = memtrace_command();
        c.args(["--max-blocks", "0", "--pid", "1"]);
        c
    });
    assert_error(&out, 2, &["max-blocks"]);
}

#[test]
fn a_full_stack_map_keeps_the_blocks_without_their_stack() {
    require_root();
    require_memtrace();
    let bin = build_fixture("aged", Variant::FramePointers);
    // (fd stacks share the table: the loader's opens would take the one
    // slot.)
    let run = run_launch(
        &["--max-stacks", "1", "--no-resources"],
        &[bin.to_str().unwrap()],
    );
    run.assert_exit(0);
    let r = &run.report;
    // old_leak's stack came first and fits; young_leak's 3 blocks are kept
    // and counted, in the site of blocks without a stack.
    assert_eq!(r.total("outstanding_blocks"), 8, "{}", r.summary());
    assert_eq!(r.total("stack_errors"), 3, "{}", r.summary());
    assert_eq!(r.0["drops"]["stack_map_full"], 3, "{}", r.0["drops"]);
    let lost: Vec<_> = r
        .sites()
        .iter()
        .filter(|s| s["stack_captured"] == false)
        .collect();
    assert_eq!(lost.len(), 1, "{}", r.summary());
    assert_eq!(
        (Report::blocks(lost[0]), Report::bytes(lost[0])),
        (3, 600),
        "{}",
        r.summary()
    );
    r.assert_outstanding(
        &[At("old_leak", Some(source_line("aged", "old_leak")))],
        5,
        500,
    );
}

/// A site whose blocks were all freed is not a leak candidate (`sites`), but
/// the JSON still lists it, in `freed_sites`, with exactly what it allocated.
#[test]
fn freed_sites_list_the_sites_whose_blocks_were_all_freed() {
    require_root();
    let AttachRun {
        run,
        tally: _,
        mut target,
    } = run_attach(
        &build_fixture("leaks", Variant::FramePointers),
        &["attach"],
        &[],
    );
    run.assert_exit(0);
    let r = &run.report;
    let line = source_line("leaks", "churn_single");
    assert!(
        r.sites_at("churn_malloc", line).is_empty(),
        "{}",
        r.summary()
    );
    let freed = r.0["freed_sites"].as_array().expect("freed_sites");
    let at: Vec<&serde_json::Value> = freed
        .iter()
        .filter(|s| {
            Report::frames(s)
                .first()
                .is_some_and(|f| f.is("churn_malloc", line))
        })
        .collect();
    assert_eq!(at.len(), 1, "one freed site at churn_malloc:{line}");
    // The fixture's loop: 20,000 blocks of 16 + (i * 37) % 2000 bytes, each
    // freed at once.
    let bytes: u64 = (0..20_000u64).map(|i| 16 + (i * 37) % 2000).sum();
    let s = at[0];
    assert_eq!(
        (
            &s["alloc_calls"],
            &s["alloc_bytes"],
            &s["freed_blocks"],
            &s["outstanding_blocks"],
            &s["outstanding_bytes"]
        ),
        (
            &20_000.into(),
            &bytes.into(),
            &20_000.into(),
            &0.into(),
            &0.into()
        ),
        "{s}"
    );
    // Every site seen is in one of the two lists.
    assert_eq!(r.0["freed_sites_left_out"]["sites"], 0);
    assert_eq!(
        (r.sites().len() + freed.len()) as u64,
        r.total("sites_seen"),
        "{}",
        r.summary()
    );
    target.finish_unharmed();
}
