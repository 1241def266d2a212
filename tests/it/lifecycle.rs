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

/// Attaching verifies each program once: a successful attach makes one
/// `BPF_PROG_LOAD` per program and attach type (a retry with a log, after a
/// first load that asked for one the verifier could not fit, doubled the
/// time to attach). free_enter is two programs: a classic uprobe's and a
/// uprobe_multi link's. The kernel feature probes aya makes have their own
/// names (or none) and are not memtrace's programs.
#[test]
fn each_program_is_verified_once() {
    require_root();
    let trace = unique_path("strace");
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=bpf", "-e", "signal=none", "-o"])
        .arg(&trace)
        .arg(require_memtrace())
        .args(["-d", "1s", "-f", "json", "--", "sleep", "3"]);
    let out = run_memtrace(cmd);
    assert_no_panic(&out.stderr);
    assert_eq!(out.code(), Some(0), "memtrace under strace: {}", out.stderr);
    let log = std::fs::read_to_string(&trace).expect("strace's output");
    let mut loads: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in log.lines().filter(|l| l.contains("BPF_PROG_LOAD")) {
        let Some(name) = line
            .split("prog_name=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let attach_type = line
            .split("expected_attach_type=")
            .nth(1)
            .and_then(|r| r.split([',', '}']).next())
            .unwrap_or("");
        let result = line.rsplit("= ").next().unwrap_or("").to_string();
        loads
            .entry(format!("{name} ({attach_type})"))
            .or_default()
            .push(result);
    }
    let ours: Vec<_> = loads
        .iter()
        .filter(|(name, _)| !name.starts_with(' ') && !name.starts_with("aya_"))
        .collect();
    // The loader breakpoint (launch mode) and the allocator's programs (the
    // session's, free's and the result sites', or the classic ones), each
    // loaded once and accepted.
    assert!(
        ours.iter().any(|(n, _)| n.starts_with("loader_breakpoi")) && ours.len() >= 3,
        "programs loaded: {loads:?}"
    );
    for (name, results) in ours {
        assert_eq!(results.len(), 1, "{name} was loaded {results:?}");
        assert!(
            !results[0].starts_with('-'),
            "{name} was refused: {results:?}"
        );
    }
}
