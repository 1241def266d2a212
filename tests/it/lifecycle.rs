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
/// time to attach). A program is counted by name and attach type
/// (free_enter is a classic uprobe's or a uprobe_multi link's). The kernel
/// feature probes aya makes have their own names (or none) and are not
/// memtrace's programs.
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
    let loads = prog_loads(&log);
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

/// The verifier's work per program stays small: the stack walk, the block
/// table and the result site are global functions it checks once (inlined,
/// or as a static bpf_loop callback, they cost it 550,000 instructions and
/// seconds of kernel time per program, at every attach).
#[test]
fn programs_take_the_verifier_little_work() {
    require_root();
    let mut cmd = memtrace_command();
    cmd.env("MEMTRACE_LOG", "debug")
        .args(["-d", "1s", "-f", "json", "--", "sleep", "2"]);
    let out = run_memtrace(cmd);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    // `BPF program alloc_session verified in 21ms: processed 8283 insns`
    let verified: Vec<(&str, u64)> = out
        .stderr
        .lines()
        .filter_map(|l| {
            let rest = l.split("BPF program ").nth(1)?;
            let name = rest.split(' ').next()?;
            let n = rest.split("processed ").nth(1)?.split(' ').next()?;
            Some((name, n.parse().ok()?))
        })
        .collect();
    for want in ["alloc_session", "alloc_result", "free_enter"] {
        assert!(
            verified.iter().any(|(n, _)| *n == want),
            "no verifier statistics for {want}: {verified:?}"
        );
    }
    for (name, insns) in verified {
        assert!(
            insns < 40_000,
            "the verifier processed {insns} instructions for {name}"
        );
    }
}

/// Each `BPF_PROG_LOAD` of a `strace -f -e trace=bpf` log, as
/// "NAME (EXPECTED_ATTACH_TYPE)" → the results of its loads. Programs
/// loaded on several threads at once show as `<unfinished ...>` lines
/// whose result comes in the thread's later `<... bpf resumed>` line.
fn prog_loads(log: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut loads: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut unfinished: std::collections::HashMap<&str, String> = Default::default();
    for line in log.lines() {
        let tid = line.split_whitespace().next().unwrap_or("");
        if line.contains("<... bpf resumed>") {
            if let Some(name) = unfinished.remove(tid) {
                let result = line.rsplit("= ").next().unwrap_or("").to_string();
                loads.entry(name).or_default().push(result);
            }
            continue;
        }
        if !line.contains("BPF_PROG_LOAD") {
            continue;
        }
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
        let name = format!("{name} ({attach_type})");
        if line.ends_with("<unfinished ...>") {
            unfinished.insert(tid, name);
        } else {
            let result = line.rsplit("= ").next().unwrap_or("").to_string();
            loads.entry(name).or_default().push(result);
        }
    }
    assert!(unfinished.is_empty(), "loads never resumed: {unfinished:?}");
    loads
}

/// A slow attach is never silent: past half a second memtrace says on
/// stderr what it is doing, before its `memtrace: attached` line; stderr
/// not being a terminal, each step is a plain line of its own, with no
/// carriage return or escape sequence (those rewrite the line in place on a
/// terminal only). The report times each step of the attach.
#[test]
fn a_slow_attach_says_what_it_does_in_plain_lines() {
    require_root();
    let mut target = TestProcess::spawn_ready(&leaks_bin(), &["attach"]);
    let mut cmd = memtrace_command();
    cmd.env("MEMTRACE_DEBUG_ATTACH_DELAY_MS", "1500")
        .args(["--pid", &target.pid().to_string()])
        .args(["-d", "1s", "-f", "json"]);
    let out = run_memtrace(cmd);
    assert_no_panic(&out.stderr);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let err = &out.stderr;
    assert!(
        !err.contains(['\r', '\x1b']),
        "a terminal's control characters on a stderr that is no terminal: {err:?}"
    );
    let lines: Vec<&str> = err.lines().collect();
    let attached = lines
        .iter()
        .position(|l| l.starts_with("memtrace: attached"))
        .expect("a `memtrace: attached` line");
    let progress: Vec<(usize, &str)> = lines
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, l)| l.starts_with("memtrace: attaching"))
        .collect();
    assert!(
        progress
            .iter()
            .any(|(_, l)| *l == "memtrace: attaching: waiting (MEMTRACE_DEBUG_ATTACH_DELAY_MS)..."),
        "no progress line while memtrace waited 1.5 s:\n{err}"
    );
    for (i, l) in &progress {
        assert!(
            *i < attached,
            "a progress line after attaching: {l:?}\n{err}"
        );
        let doing = l
            .strip_prefix("memtrace: attaching: ")
            .and_then(|d| d.strip_suffix("..."))
            .unwrap_or_else(|| panic!("a malformed progress line: {l:?}"));
        assert!(
            doing.starts_with(|c: char| c.is_ascii_lowercase())
                && doing
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || " _(),/'".contains(c)),
            "a malformed progress line: {l:?}"
        );
    }
    assert!(
        progress.windows(2).all(|w| w[0].1 != w[1].1),
        "a progress line repeated:\n{err}"
    );
    let report = Report(serde_json::from_str(&out.stdout).expect("one JSON report on stdout"));
    let attach = &report.0["attach"];
    let step = |name: &str| attach["steps"][name].as_f64();
    assert!(attach["total_s"].as_f64().unwrap() >= 1.5, "{attach}");
    assert!(step("debug_delay").unwrap() >= 1.5, "{attach}");
    for name in [
        "inspect_target",
        "create_maps",
        "verify_alloc_session",
        "unwind_tables",
        "attach_probes",
    ] {
        assert!(step(name).is_some(), "no step {name}: {attach}");
    }
    target.go();
    target.wait_done();
    target.finish_unharmed();
}
