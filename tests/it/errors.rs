//! Every user mistake and runtime failure ends with a `memtrace: error:` message,
//! the contract's exit status (2 usage, 1 runtime), nothing attached, no panic,
//! and the target (if any) left running unharmed.

use std::process::Command;
use std::time::{Duration, Instant};

use memtrace_tests::*;

fn leaks_target() -> TestProcess {
    TestProcess::spawn_ready(&build_fixture("leaks", Variant::FramePointers), &["attach"])
}

fn memtrace(args: &[&str]) -> Output {
    let mut c = memtrace_command();
    c.args(args);
    run_memtrace(c)
}

/// The target was not disturbed: it does its work and exits normally.
fn assert_unharmed(mut target: TestProcess) {
    assert!(target.is_running(), "the target died");
    target.go();
    target.wait_done();
    target.finish_unharmed();
}

#[test]
fn error_no_such_process() {
    require_root();
    let pid = unused_pid().to_string();
    let out = memtrace(&["--pid", &pid]);
    assert_error(
        &out,
        1,
        &[&pid, "no such process", "not exist", "not found"],
    );
}

#[test]
fn error_not_root() {
    require_root();
    let bin = world_executable_memtrace();
    let target = leaks_target();
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["--pid", &target.pid().to_string()])
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LOG");
    let out = run_memtrace(c);
    assert_error(
        &out,
        1,
        &["root", "privilege", "permission", "capabilit", "CAP_"],
    );
    assert_unharmed(target);
}

#[test]
fn error_kernel_thread() {
    require_root();
    // pid 2 is kthreadd: no user address space, nothing to trace.
    let out = memtrace(&["--pid", "2"]);
    assert_error(&out, 1, &["kernel"]);
}

#[test]
fn error_no_allocator_in_target() {
    require_root();
    let bin = build_fixture("noalloc", Variant::FramePointers);
    let mut target = TestProcess::spawn(&bin, &[]);
    let out = memtrace(&["--pid", &target.pid().to_string()]);
    assert_error(&out, 1, &["alloc"]);
    assert!(target.is_running(), "the target died");
}

#[test]
fn error_bad_durations() {
    require_root();
    let target = leaks_target();
    let pid = target.pid().to_string();
    for (opt, value) in [
        ("--interval", "5x"),
        ("--interval", ""),
        ("--duration", "abc"),
        ("--duration=-1s", ""),
        ("--duration", "1.5.3s"),
        ("-d", "10 parsecs"),
        ("--min-age", "5xs"),
        ("-i", "s"),
    ] {
        let mut args = vec![opt];
        let mut mention = vec![];
        if let Some((_, v)) = opt.split_once('=') {
            mention.push(v); // --opt=value: the value alone
        } else {
            args.push(value);
            if !value.is_empty() {
                mention.push(value);
            }
        }
        args.extend(["--pid", &pid]);
        let out = memtrace(&args);
        assert_error(&out, 2, &mention);
    }
    // The same in launch mode: nothing is launched.
    let out = memtrace(&["--interval", "5x", "--", "/bin/true"]);
    assert_error(&out, 2, &["5x"]);
    assert_unharmed(target);
}

#[test]
fn error_other_usage() {
    require_root();
    let target = leaks_target();
    let pid = target.pid().to_string();
    for args in [
        vec![],
        vec!["--pid", "notapid"],
        vec!["--pid"],
        vec!["--no-such-option", "--pid", &pid],
        vec!["-f", "nosuchformat", "--pid", &pid],
        vec!["--top", "many", "--pid", &pid],
    ] {
        let out = memtrace(&args);
        assert_error(&out, 2, &[]);
        assert!(
            out.stdout.trim().is_empty(),
            "memtrace {args:?} wrote to stdout: {}",
            out.stdout
        );
    }
    assert_unharmed(target);
}

#[test]
fn error_unwritable_output_attach() {
    require_root();
    let target = leaks_target();
    let pid = target.pid().to_string();
    let dir = scratch_dir();
    for path in [
        "/nonexistent-memtrace-dir/report.json",
        dir.to_str().unwrap(),
    ] {
        let out = memtrace(&["-f", "json", "-o", path, "--pid", &pid]);
        assert_error(&out, 1, &[path, "output", "writ"]);
    }
    assert_unharmed(target);
}

#[test]
fn error_unwritable_output_launch() {
    require_root();
    let marker = unique_path("ran");
    let script = format!("echo ran > '{}'", marker.display());
    let out = memtrace(&[
        "-f",
        "json",
        "-o",
        "/nonexistent-memtrace-dir/report.json",
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    assert_error(
        &out,
        1,
        &["/nonexistent-memtrace-dir/report.json", "output", "writ"],
    );
    assert!(
        !marker.exists(),
        "memtrace ran the command although it could not write its report"
    );
}

#[test]
fn error_target_exits_during_attach() {
    require_root();
    let mut target = leaks_target();
    // memtrace sleeps this long after finding the allocator, before attaching.
    let mut session = AttachSession::spawn(
        target.pid(),
        &[],
        &[("MEMTRACE_DEBUG_ATTACH_DELAY_MS", "4000")],
    );
    // Kill the target once memtrace is in that sleep (nanosleep / clock_nanosleep);
    // failing to see it (it is brief to look for), after 3 s: within the delay.
    let mpid = session.memtrace.pid();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if blocked_syscalls(mpid)
            .iter()
            .any(|&n| n == libc::SYS_nanosleep || n == libc::SYS_clock_nanosleep)
        {
            break;
        }
        if let Some(st) = session.memtrace.try_status() {
            panic!(
                "memtrace exited ({}) before the target did; stderr:\n{}",
                describe_status(&st),
                session.memtrace.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    target.kill();
    let status = session.memtrace.wait(EXIT_TIMEOUT);
    let out = Output {
        status,
        stdout: session.memtrace.stdout(),
        stderr: session.memtrace.stderr(),
    };
    assert_error(
        &out,
        1,
        &[
            "exit",
            "terminat",
            "gone",
            "died",
            "no longer",
            "vanish",
            "disappear",
            "no such process",
        ],
    );
}
