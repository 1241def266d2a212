//! How a tracing session ends: SIGINT, SIGTERM, --duration, the target's exit;
//! what is left behind (a report, an unharmed target, the child's exit status).

use memtrace_tests::*;

fn leaks_bin() -> std::path::PathBuf {
    build_fixture("leaks", Variant::FramePointers)
}

fn deep_site() -> leaks::Site {
    leaks::CORE[0]
}

#[test]
fn sigint_then_target_runs_on_unharmed() {
    require_root();
    let AttachRun {
        run,
        tally: _,
        mut target,
    } = run_attach(&leaks_bin(), &["attach"], &[]);
    run.assert_exit(0);
    deep_site().assert_in(&run.report);
    // Probes are gone: the target allocates, reallocs and frees, and exits 0.
    target.finish_unharmed();
}

#[test]
fn sigterm_writes_report() {
    require_root();
    let mut target = TestProcess::spawn_ready(&leaks_bin(), &["attach"]);
    let session = attach(&target, &[]);
    target.go();
    target.wait_done();
    let run = session.stop(libc::SIGTERM);
    run.assert_exit(0);
    for site in leaks::CORE {
        site.assert_in(&run.report);
    }
    target.finish_unharmed();
}

#[test]
fn duration_ends_tracing_by_itself() {
    require_root();
    require_memtrace();
    // The target stays blocked while traced: an empty report.
    let mut target = TestProcess::spawn_ready(&leaks_bin(), &["attach"]);
    let session = attach(&target, &["--duration", "2s"]);
    let run = session.finish();
    run.assert_exit(0);
    assert!(run.report.sites().is_empty(), "{}", run.report.summary());
    assert_eq!(run.report.total("outstanding_blocks"), 0);
    assert_eq!(run.report.total("alloc_calls"), 0);
    assert_eq!(run.report.target()["exited"], false);
    assert!(target.is_running());
    target.go();
    target.wait_done();
    target.finish_unharmed();
}

#[test]
fn short_interval_does_not_disturb_the_report() {
    require_root();
    let AttachRun {
        run,
        tally: _,
        target: _t,
    } = run_attach(&leaks_bin(), &["attach"], &["--interval", "200ms"]);
    run.assert_exit(0);
    for site in leaks::CORE {
        site.assert_in(&run.report);
    }
}

#[test]
fn launch_exit_status_of_a_signal() {
    require_root();
    let bin = leaks_bin();
    let run = run_launch(&[], &[bin.to_str().unwrap(), "launch-signal"]);
    run.assert_exit(128 + libc::SIGTERM);
    assert_eq!(
        run.report.target()["exited"],
        true,
        "{}",
        run.report.target()
    );
    deep_site().assert_in(&run.report);
}

#[test]
fn launch_child_keeps_its_stdout_and_arguments() {
    require_root();
    let run = run_launch(
        &[],
        &["/bin/sh", "-c", "echo \"hello $0 $1\"; exit 5", "a b", "c"],
    );
    run.assert_exit(5);
    assert!(
        run.stdout.contains("hello a b c"),
        "the child's stdout: {:?}",
        run.stdout
    );
}

#[test]
fn an_existing_report_file_is_replaced_whole() {
    require_root();
    let bin = leaks_bin();
    let path = unique_path("json");
    // Longer than the report: none of it may be left after the new one.
    std::fs::write(&path, "x".repeat(4 << 20)).unwrap();
    let out = memtrace_command()
        .args(["-f", "json", "-o"])
        .arg(&path)
        .arg("--")
        .args([bin.to_str().unwrap(), "launch"])
        .output()
        .expect("running memtrace");
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("memtrace: report written to"), "{stderr}");
    let report = Report(serde_json::from_str(&text).expect("the file holds one JSON report"));
    // The child's exit status is memtrace's in launch mode.
    assert_eq!(
        out.status.code().map(i64::from),
        report.target()["exit_status"].as_i64(),
        "{stderr}"
    );
    deep_site().assert_in(&report);
}
