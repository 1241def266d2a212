//! File descriptors created or released with no syscall memtrace traces:
//! io_uring's OPENAT and CLOSE (found by the reconciliation with /proc and
//! counted), and the close-on-exec fds an exec releases (never carried as
//! leaks, whether memtrace follows the exec or not). SCM_RIGHTS, dup2 over
//! an open fd and close_range are in resources.rs.

use memtrace_tests::*;
use serde_json::{Value, json};

fn bin() -> std::path::PathBuf {
    build_fixture("fd_implicit", Variant::FramePointers)
}

/// Scans /proc often enough for the fixture's naps of 400 ms.
const ARGS: &[&str] = &["--interval", "100ms"];

fn fds(r: &Report) -> &Value {
    let f = &r.0["resources"]["fds"];
    assert!(f.is_object(), "no resources.fds in the report:\n{}", r.0);
    f
}

fn fd_sites(r: &Report) -> &[Value] {
    fds(r)["sites"].as_array().expect("resources.fds.sites")
}

/// Each fd site: its count, kind and stack's first functions.
fn describe(r: &Report) -> String {
    fd_sites(r)
        .iter()
        .map(|s| {
            let frames: Vec<String> = Report::frames(s)
                .iter()
                .take(5)
                .map(|f| f.function().to_string())
                .collect();
            format!(
                "  {} {} < {}\n",
                s["outstanding"],
                s["kind"],
                frames.join(" < ")
            )
        })
        .collect()
}

/// The functions of every fd site's stack, by site.
fn site_functions(r: &Report) -> Vec<Vec<String>> {
    fd_sites(r)
        .iter()
        .map(|s| {
            Report::frames(s)
                .iter()
                .map(|f| f.function().to_string())
                .collect()
        })
        .collect()
}

/// io_uring creates and closes fds with no open or close syscall: the
/// reconciliation with /proc/PID/fd catches both and counts them; the fd
/// opened by io_uring is listed as appeared untraced (no stack), the traced
/// fd io_uring closed is released (vanished), never held by its site.
#[test]
fn io_uring_opens_and_closes_are_found_and_counted_by_the_reconciliation() {
    require_root();
    let bin = bin();
    let run = run_launch(ARGS, &[bin.to_str().unwrap(), "uring"]);
    run.assert_exit(0);
    let tally = run.fixture_tally().expect("the fixture's done line");
    let r = &run.report;
    let f = fds(r);
    let rec = &f["reconciliation"];
    assert_eq!(rec["appeared_untraced"], json!({ "file": 1 }), "{f}");
    assert_eq!(rec["vanished"], json!({ "device": 1 }), "{f}");
    let appeared = &f["appeared_untraced"];
    assert_eq!(u64_field(appeared, "fds"), tally.get("kept"), "{f}");
    assert_eq!(appeared["open"][0]["fd"], tally.get("kept_fd"), "{f}");
    assert_eq!(appeared["open"][0]["target"], bin.display().to_string());
    // The one fd site left is the ring's: /dev/zero, closed by io_uring,
    // is held by no site.
    let sites = fd_sites(r);
    assert_eq!(sites.len(), 1, "{}", describe(r));
    assert_eq!(sites[0]["kind"], "io_uring", "{}", describe(r));
    assert_eq!(u64_field(&sites[0], "outstanding"), 1);
    assert!(
        site_functions(r)[0].iter().any(|f| f == "ring_setup"),
        "{}",
        describe(r)
    );
    assert_eq!(sites[0]["fds"][0]["fd"], tally.get("ring"));
    // No close(2) of it was seen, so none counts as untracked either.
    assert_eq!(f["events"]["close_untracked"], 0, "{f}");
    assert_eq!(f["events"]["created_over_open"], 0, "{f}");
}

/// The fixture's `exec cloexec=N carried=M` line.
fn exec_line(run: &Run) -> Tally {
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("exec "))
        .unwrap_or_else(|| panic!("no exec line:\n{}", run.stdout));
    Tally::parse(line)
}

/// Following the exec: the new program's report starts with the fds the
/// exec kept, as existed at attach, and none of the close-on-exec ones.
#[test]
fn an_exec_followed_carries_only_the_fds_without_close_on_exec() {
    require_root();
    let bin = bin();
    let run = run_launch(ARGS, &[bin.to_str().unwrap(), "exec"]);
    run.assert_exit(0);
    let before = exec_line(&run);
    let tally = run.fixture_tally().expect("the new program's done line");
    assert_eq!(tally.get("carried"), before.get("carried"));
    let r = &run.report;
    let images = r.0["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{}", r.0["images"]);
    assert_eq!(images[0]["ended_by_exec"], true);
    let f = fds(r);
    let e = &f["existed_at_attach"];
    assert_eq!(u64_field(e, "fds"), tally.get("carried"), "{e}");
    assert_eq!(u64_field(e, "released"), 0, "{e}");
    assert_eq!(e["by_kind"]["eventfd"]["fds"], 1, "{e}");
    // The fd whose close-on-exec F_SETFD cleared.
    assert!(
        e["open"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["target"] == "/dev/zero"),
        "{e}"
    );
    assert_eq!(f["open"], tally.get("carried"), "{f}");
    assert!(fd_sites(r).is_empty(), "{}", describe(r));
}

/// Not following the exec: the report is the old program's, and the exec
/// released every close-on-exec fd however the flag was set (open, pipe2,
/// SOCK_CLOEXEC, F_SETFD, dup3, close_range's CLOSE_RANGE_CLOEXEC); only
/// the fds the new program got are still held.
#[test]
fn an_exec_not_followed_releases_the_close_on_exec_fds() {
    require_root();
    let bin = bin();
    let mut args = ARGS.to_vec();
    args.push("--no-follow-exec");
    let run = run_launch(&args, &[bin.to_str().unwrap(), "exec"]);
    run.assert_exit(0);
    let before = exec_line(&run);
    let r = &run.report;
    let f = fds(r);
    assert_eq!(
        f["events"]["released_at_exec"],
        before.get("cloexec"),
        "{f}"
    );
    for functions in site_functions(r) {
        assert!(
            !functions.iter().any(|f| f == "open_cloexec"),
            "{}",
            describe(r)
        );
    }
    // open_carried's three fds: /dev/zero (its flag cleared), the
    // executable, an eventfd.
    let carried: Vec<&Value> = fd_sites(r)
        .iter()
        .zip(site_functions(r))
        .filter(|(_, functions)| functions.iter().any(|f| f == "open_carried"))
        .map(|(s, _)| s)
        .collect();
    let mut kinds: Vec<&str> = carried.iter().filter_map(|s| s["kind"].as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["device", "eventfd", "file"], "{}", describe(r));
    assert!(
        carried.iter().all(|s| u64_field(s, "outstanding") == 1),
        "{}",
        describe(r)
    );
}
