//! File descriptors: every kind, with its creating stack through the libc
//! wrapper, balanced churn never reported, the fds that existed at attach,
//! dup2 over an open fd, close_range, an fd received with SCM_RIGHTS (found
//! by the reconciliation with /proc), and the verdict of a connection leak.

use memtrace_tests::*;
use serde_json::Value;

fn fds_bin() -> std::path::PathBuf {
    build_fixture("fds", Variant::FramePointers)
}

/// Samples often enough for the fixture's 16 rounds of 50 ms to make a history.
const ARGS: &[&str] = &["--interval", "100ms"];

fn fds(r: &Report) -> &Value {
    let f = &r.0["resources"]["fds"];
    assert!(f.is_object(), "no resources.fds in the report:\n{}", r.0);
    f
}

fn fd_sites(r: &Report) -> &[Value] {
    fds(r)["sites"].as_array().expect("resources.fds.sites")
}

/// The fd sites whose stack holds `function`.
fn sites_of<'a>(r: &'a Report, function: &str) -> Vec<&'a Value> {
    fd_sites(r)
        .iter()
        .filter(|s| {
            Report::frames(s)
                .iter()
                .any(|f| f.function.as_deref() == Some(function))
        })
        .collect()
}

/// The one fd site of `function`: its kind and open fds.
fn site<'a>(r: &'a Report, function: &str) -> &'a Value {
    let found = sites_of(r, function);
    assert_eq!(found.len(), 1, "fd sites of {function}:\n{}", describe(r));
    found[0]
}

fn describe(r: &Report) -> String {
    fd_sites(r)
        .iter()
        .map(|s| {
            let frames: Vec<String> = Report::frames(s)
                .iter()
                .take(4)
                .map(|f| f.function().to_string())
                .collect();
            format!(
                "  {} {} {} ({}) < {}\n",
                s["outstanding"],
                s["kind"],
                s["verdict"],
                s["description"],
                frames.join(" < ")
            )
        })
        .collect()
}

/// What every run of the fixture holds, launch or attach.
fn assert_kept_sites(r: &Report, port: u64) {
    let expect = [
        ("make_listener", "socket", 1),
        ("leak_connection", "socket", 16),
        ("accept_peer", "socket", 16),
        ("keep_file", "file", 1),
        ("keep_pipe", "pipe", 2),
        ("keep_unix_pair", "socket", 2),
        ("keep_eventfd", "eventfd", 1),
        ("keep_epoll", "epoll", 1),
        ("keep_timerfd", "timerfd", 1),
        ("keep_signalfd", "signalfd", 1),
        ("keep_memfd", "memfd", 1),
        ("keep_inotify", "inotify", 1),
        ("keep_pidfd", "pidfd", 1),
        ("dup2_over_open", "file", 1),
    ];
    for (function, kind, n) in expect {
        let s = site(r, function);
        assert_eq!(s["kind"], kind, "{function}:\n{}", describe(r));
        assert_eq!(
            u64_field(s, "outstanding"),
            n,
            "{function}:\n{}",
            describe(r)
        );
        assert_eq!(s["stack_captured"], true, "{function}");
        // The walk goes through the libc wrapper to its caller, and on to main.
        let names: Vec<String> = Report::frames(s)
            .iter()
            .map(|f| f.function().to_string())
            .collect();
        assert!(names.iter().any(|n| n == "main"), "{function}: {names:?}");
    }
    // The connections: their peer, state and verdict.
    let conns = site(r, "leak_connection");
    assert_eq!(
        conns["description"],
        format!("TCP 127.0.0.1:{port} ESTABLISHED"),
        "{}",
        describe(r)
    );
    assert_eq!(conns["verdict"], "leak", "{}", describe(r));
    assert_eq!(site(r, "accept_peer")["verdict"], "leak", "{}", describe(r));
    assert_eq!(u64_field(conns, "created"), 16);
    assert_eq!(conns["fds"].as_array().unwrap().len(), 16);
    assert_eq!(
        site(r, "make_listener")["description"],
        format!("TCP listening on 127.0.0.1:{port}")
    );
    assert_eq!(
        site(r, "keep_file")["description"],
        fds_bin().display().to_string()
    );
    // dup2 over an open fd: the dup's site holds it (as the file it copies).
    assert_eq!(site(r, "dup2_over_open")["origin"], "open");
    // Churn is never reported, nor the fds close_range closed.
    for function in ["churn_all", "range_closed", "received_fd"] {
        assert!(
            sites_of(r, function).is_empty(),
            "{function}:\n{}",
            describe(r)
        );
    }
    let f = fds(r);
    assert_eq!(f["events"]["replaced_by_dup"], 1, "{f}");
    assert_eq!(f["events"]["closed_by_range"], 3, "{f}");
    assert_eq!(f["events"]["beyond_table"], 0, "{f}");
    assert_eq!(f["events"]["regs_read_errors"], 0, "{f}");
    // The fd received with SCM_RIGHTS: no traced creation, found in /proc.
    assert_eq!(f["reconciliation"]["appeared_untraced"]["file"], 1, "{f}");
    assert_eq!(
        f["reconciliation"]["vanished"],
        serde_json::json!({}),
        "{f}"
    );
    assert_eq!(u64_field(&f["appeared_untraced"], "fds"), 1, "{f}");
    let got = &f["appeared_untraced"]["open"][0];
    assert_eq!(
        got["target"],
        format!("/proc/{}/stat", r.target()["pid"]),
        "{f}"
    );
}

#[test]
fn launch_traces_every_kind_and_reports_no_churn() {
    require_root();
    let bin = fds_bin();
    let mut args = ARGS.to_vec();
    args.push("--fail-on-leak");
    let run = run_launch(&args, &[bin.to_str().unwrap(), "launch"]);
    // No heap leak in this fixture: the status is the fd leak's.
    assert_eq!(run.report.0["verdicts"]["leak"], 0);
    run.assert_exit(3);
    let tally = run.fixture_tally().expect("the fixture's done line");
    let r = &run.report;
    assert_kept_sites(r, tally.get("port"));
    // Every traced fd open at the end is in a site.
    let open: u64 = fd_sites(r)
        .iter()
        .map(|s| u64_field(s, "outstanding"))
        .sum();
    assert_eq!(open, tally.get("kept") - 1, "{}", describe(r));
    // The connections and their accepted ends.
    assert_eq!(fds(r)["verdicts"]["leak"], 2, "{}", describe(r));
}

#[test]
fn attach_lists_what_existed_and_counts_its_release_apart() {
    require_root();
    let mut target = TestProcess::spawn_ready(&fds_bin(), &["attach"]);
    // What it holds before memtrace comes (stdio and whatever the harness
    // passed on, plus the fixture's own).
    let before = std::fs::read_dir(format!("/proc/{}/fd", target.pid()))
        .unwrap()
        .count() as u64;
    let session = attach(&target, ARGS);
    target.go();
    let tally = target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let r = &run.report;
    assert_kept_sites(r, tally.get("port"));
    let f = fds(r);
    // Every creation and close the fixture made, and nothing else.
    assert_eq!(f["events"]["created"], tally.get("created"), "{f}");
    assert_eq!(f["events"]["closed"], tally.get("closed"), "{f}");
    // The pipe's read end, which existed at attach, closed while traced.
    assert_eq!(f["events"]["close_untracked"], 1, "{f}");
    let e = &f["existed_at_attach"];
    assert_eq!(u64_field(e, "fds"), before, "{e}");
    assert_eq!(e["by_kind"]["socket"]["fds"], 1, "{e}");
    assert_eq!(e["by_kind"]["pipe"]["released"], 1, "{e}");
    assert_eq!(u64_field(e, "released"), 1, "{e}");
    assert_eq!(
        e["open"].as_array().unwrap().len() as u64,
        before - 1,
        "{e}"
    );
    // Never a site with an invented stack.
    assert!(
        fd_sites(r).iter().all(|s| s["stack_captured"] == true),
        "{}",
        describe(r)
    );
    let open: u64 = fd_sites(r)
        .iter()
        .map(|s| u64_field(s, "outstanding"))
        .sum();
    assert_eq!(open, tally.get("kept") - 1, "{}", describe(r));
    target.finish_unharmed();
}

#[test]
fn no_resources_traces_no_fd() {
    require_root();
    let bin = fds_bin();
    let run = run_launch(&["--no-resources"], &[bin.to_str().unwrap(), "launch"]);
    run.assert_exit(0);
    assert_eq!(run.report.0["resources"], Value::Null);
}

/// fd stacks share the stack table: when it is full, an fd's walk that
/// finds no room is counted among the fd events, not in the heap's drops,
/// which count allocations only.
#[test]
fn fd_walks_count_their_failures_apart() {
    require_root();
    let bin = build_fixture("aged", Variant::FramePointers);
    let run = run_launch(&["--max-stacks", "1"], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let lost: u64 = r
        .sites()
        .iter()
        .filter(|s| s["stack_captured"] == false)
        .map(Report::blocks)
        .sum();
    // Every block of aged is kept: each allocation without a stack is in
    // the site of blocks without one.
    assert_eq!(r.total("stack_errors"), lost, "{}", r.summary());
    assert_eq!(r.0["drops"]["stack_map_full"], lost, "{}", r.0["drops"]);
    let e = &fds(r)["events"];
    // The loader's opens come first: one takes the one slot, the next finds
    // none.
    assert!(u64_field(e, "no_stack") >= 1, "{e}");
    assert_eq!(
        e["no_stack"],
        u64_field(e, "stack_map_full")
            + u64_field(e, "stack_read_errors")
            + u64_field(e, "stack_hash_collisions"),
        "{e}"
    );
}
