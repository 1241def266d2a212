//! Services as they really run: a wrapper that execs the program (env,
//! `sh -c`, a launcher script, a program that execs another), in launch and
//! attach mode; and a child the target forks, which is not followed but said.

use memtrace_tests::*;
use serde_json::Value;

fn app() -> std::path::PathBuf {
    build_fixture("exec_app", Variant::NoFramePointers)
}

/// The app's two sites, exactly, with their real frames; every site is the
/// app's (none under the wrapper), and nothing else is outstanding.
fn assert_app_sites(r: &Report) {
    r.assert_outstanding(
        &[
            At("app_leak", Some(source_line("exec_app", "app_leak"))),
            At("work", None),
            At("main", None),
        ],
        7,
        7 * 300,
    );
    r.assert_outstanding(
        &[
            At("app_deep", Some(source_line("exec_app", "app_deep"))),
            At("deeper", None),
            At("work", None),
            At("main", None),
        ],
        3,
        3 * 5000,
    );
    for site in r.sites() {
        assert!(
            Report::frames(site).iter().any(|f| f.function() == "work"),
            "a site that is not the app's\n{}",
            r.summary()
        );
    }
    assert_eq!(
        u64_field(&r.0["totals"], "outstanding_blocks"),
        10,
        "{}",
        r.summary()
    );
    assert_eq!(
        u64_field(&r.0["totals"], "outstanding_bytes"),
        7 * 300 + 3 * 5000
    );
}

fn images(r: &Report) -> &Vec<Value> {
    r.0["images"].as_array().expect("the report's images")
}

/// A launched wrapper's image, then the app's, traced from its start.
fn assert_wrapped(run: &Run, wrapper_exe: &str) {
    run.assert_exit(0);
    let r = &run.report;
    assert_eq!(r.0["end_reason"], "target-exited", "{}", run.stderr);
    assert_app_sites(r);
    let tally = run.fixture_tally().expect("the app's done line");
    assert_eq!(
        u64_field(&r.0["totals"], "alloc_calls"),
        tally.get("alloc_calls")
    );
    assert_eq!(
        u64_field(&r.0["totals"], "alloc_bytes"),
        tally.get("alloc_bytes")
    );
    let imgs = images(r);
    assert_eq!(imgs.len(), 2, "{:#?}\n{}", imgs, run.stderr);
    assert_eq!(imgs[0]["exe"], wrapper_exe, "{imgs:#?}");
    assert_eq!(imgs[0]["traced"], true);
    assert_eq!(imgs[0]["ended_by_exec"], true);
    assert_eq!(imgs[1]["exe"], app().to_str().unwrap(), "{imgs:#?}");
    assert_eq!(imgs[1]["traced"], true);
    assert_eq!(imgs[1]["ended_by_exec"], false);
    // Stopped at its exec: traced from its first instruction.
    assert_eq!(imgs[1]["tracing_started_after_ms"], Value::Null);
    assert_eq!(r.0["forks_not_followed"]["count"], 0, "{}", run.stderr);
}

fn real_path(p: &str) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

#[test]
fn launch_through_env_traces_the_app() {
    require_root();
    require_memtrace();
    let app = app();
    let run = run_launch(&[], &["env", "X=1", app.to_str().unwrap(), "launch"]);
    assert_wrapped(&run, &real_path("/usr/bin/env"));
    assert!(run.stderr.contains("exec'd"), "{}", run.stderr);
}

/// `sh -c '... exec app'`: Debian's sh (dash) forks even for the last
/// command of `-c` unless told `exec`; bash execs it.
#[test]
fn launch_through_sh_c_exec_traces_the_app() {
    require_root();
    require_memtrace();
    let app = app();
    let cmd = format!("X=1; exec {} launch", app.display());
    let run = run_launch(&[], &["sh", "-c", &cmd]);
    assert_wrapped(&run, &real_path("/bin/sh"));
}

#[test]
fn launch_through_bash_c_traces_the_app() {
    require_root();
    require_memtrace();
    let app = app();
    let cmd = format!("X=1 {} launch", app.display());
    let run = run_launch(&[], &["bash", "-c", &cmd]);
    assert_wrapped(&run, &real_path("/bin/bash"));
}

#[test]
fn launch_through_a_launcher_script_traces_the_app() {
    require_root();
    require_memtrace();
    use std::os::unix::fs::PermissionsExt;
    let app = app();
    let script = unique_path("sh");
    std::fs::write(&script, "#!/bin/sh\nexport X=1\nexec \"$@\"\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = run_launch(
        &[],
        &[script.to_str().unwrap(), app.to_str().unwrap(), "launch"],
    );
    let _ = std::fs::remove_file(&script);
    // The kernel runs a script's interpreter: that is the first image.
    assert_wrapped(&run, &real_path("/bin/sh"));
}

/// The old image's blocks are closed at the exec, counted there, and
/// never reported as the new image's.
#[test]
fn an_exec_closes_the_old_images_blocks() {
    require_root();
    require_memtrace();
    let bin = build_fixture("exec_after", Variant::NoFramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    assert_eq!(r.0["end_reason"], "target-exited", "{}", run.stderr);
    r.assert_no_frame("the old image's", |f| f == "before_exec");
    let imgs = images(r);
    assert_eq!(imgs.len(), 2, "{imgs:#?}");
    assert_eq!(imgs[0]["exe"], bin.to_str().unwrap());
    assert_eq!(imgs[0]["alloc_calls"], 5, "{imgs:#?}");
    assert_eq!(imgs[0]["alloc_bytes"], 5 * 777);
    assert_eq!(imgs[0]["closed_blocks"], 5);
    assert_eq!(imgs[0]["closed_bytes"], 5 * 777);
    assert_eq!(imgs[1]["exe"], real_path("/bin/sleep"));
}

/// Attach mode: the running program execs the app; memtrace attaches to the
/// app once it is seen and says how long after its exec.
#[test]
fn attach_mode_follows_an_exec() {
    require_root();
    require_memtrace();
    let app = app();
    let bin = build_fixture("exec_after", Variant::NoFramePointers);
    let mut target = TestProcess::spawn(&bin, &["attach", app.to_str().unwrap()]);
    target.wait_ready();
    let mut session = attach(&target, &[]);
    target.go();
    // The app's own "ready", and memtrace on it.
    target.wait_ready();
    session
        .memtrace
        .wait_said(&format!("memtrace: pid {} exec'd", target.pid()));
    target.go();
    let tally = target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let r = &run.report;
    assert_eq!(r.0["end_reason"], "signal", "{}", run.stderr);
    assert_app_sites(r);
    assert_eq!(
        u64_field(&r.0["totals"], "alloc_calls"),
        tally.get("alloc_calls")
    );
    let imgs = images(r);
    assert_eq!(imgs.len(), 2, "{imgs:#?}");
    assert_eq!(imgs[0]["exe"], bin.to_str().unwrap());
    assert_eq!(imgs[0]["closed_blocks"], 5, "{imgs:#?}");
    assert_eq!(imgs[0]["closed_bytes"], 5 * 777);
    assert_eq!(imgs[1]["exe"], app.to_str().unwrap());
    assert!(
        imgs[1]["tracing_started_after_ms"].as_f64().is_some(),
        "{imgs:#?}"
    );
    target.close_stdin();
}

/// A child the target forks is not followed: the parent's leak is reported,
/// the child's is not, and the report says a child existed, with its pid.
#[test]
fn an_unfollowed_fork_is_said_with_its_pid() {
    require_root();
    require_memtrace();
    let app = app();
    let run = run_launch(&[], &[app.to_str().unwrap(), "fork"]);
    run.assert_exit(0);
    let r = &run.report;
    let child = run
        .stdout
        .lines()
        .find(|l| l.starts_with("child"))
        .map(Tally::parse)
        .expect("the fixture's child line")
        .get("pid");
    r.assert_outstanding(
        &[
            At("parent_leak", Some(source_line("exec_app", "parent_leak"))),
            At("forking", None),
            At("main", None),
        ],
        4,
        4000,
    );
    r.assert_no_frame("the child's", |f| f == "child_leak" || f == "in_child");
    assert_eq!(
        u64_field(&r.0["totals"], "outstanding_blocks"),
        4,
        "{}",
        r.summary()
    );
    let forks = &r.0["forks_not_followed"];
    assert_eq!(forks["count"], 1, "{forks}");
    assert_eq!(forks["pids"], serde_json::json!([child]), "{forks}");
}
