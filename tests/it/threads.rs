//! Threads: each creating site with its stack through the libc wrapper
//! (pthread_create → clone3), threads that never end and threads that exit
//! unjoined reported as leaks, joined and detached churn never reported,
//! the threads that existed at attach listed apart; and a Python service
//! that leaks a thread and a connection per request, named by its lines.

use memtrace_tests::*;
use serde_json::Value;

const ROUNDS: u64 = 12;

fn bin() -> std::path::PathBuf {
    build_fixture("thread_sites", Variant::FramePointers)
}

/// Samples often enough for the fixture's rounds of 50 ms to make a history.
const ARGS: &[&str] = &["--interval", "100ms"];

fn threads(r: &Report) -> &Value {
    let t = &r.0["resources"]["threads"];
    assert!(
        t.is_object(),
        "no resources.threads in the report:\n{}",
        r.0
    );
    t
}

fn sites(r: &Report) -> &[Value] {
    threads(r)["sites"]
        .as_array()
        .expect("resources.threads.sites")
}

fn describe(r: &Report) -> String {
    sites(r)
        .iter()
        .map(|s| {
            let frames: Vec<String> = Report::frames(s)
                .iter()
                .take(6)
                .map(|f| format!("{}:{}", f.function(), f.line.unwrap_or(0)))
                .collect();
            format!(
                "  {} ({} alive, {} unjoined) {} {} < {}\n",
                s["outstanding"],
                s["alive"],
                s["exited_unjoined"],
                s["verdict"],
                s["description"],
                frames.join(" < ")
            )
        })
        .collect::<String>()
        + &format!("events: {}", threads(r)["events"])
}

/// The thread sites whose stack holds `function`.
fn sites_of<'a>(r: &'a Report, function: &str) -> Vec<&'a Value> {
    sites(r)
        .iter()
        .filter(|s| {
            Report::frames(s)
                .iter()
                .any(|f| f.function.as_deref() == Some(function))
        })
        .collect()
}

fn site<'a>(r: &'a Report, function: &str) -> &'a Value {
    let found = sites_of(r, function);
    assert_eq!(
        found.len(),
        1,
        "thread sites of {function}:\n{}",
        describe(r)
    );
    found[0]
}

/// What every run of the fixture holds, launch or attach.
fn assert_thread_sites(r: &Report) {
    for (function, alive, unjoined) in [("start_forever", ROUNDS, 0), ("start_unjoined", 0, ROUNDS)]
    {
        let s = site(r, function);
        let what = format!("{function}:\n{}", describe(r));
        assert_eq!(s["kind"], "thread", "{what}");
        assert_eq!(u64_field(s, "alive"), alive, "{what}");
        assert_eq!(u64_field(s, "exited_unjoined"), unjoined, "{what}");
        assert_eq!(u64_field(s, "outstanding"), ROUNDS, "{what}");
        assert_eq!(u64_field(s, "created"), ROUNDS, "{what}");
        assert_eq!(s["verdict"], "leak", "{what}");
        assert_eq!(s["stack_captured"], true, "{what}");
        assert_eq!(s["threads"].as_array().unwrap().len() as u64, ROUNDS);
        // Through the libc wrapper and pthread_create to the line that
        // created them, and on to main.
        let frames = Report::frames(s);
        let line = source_line("thread_sites", function);
        assert!(
            frames.iter().any(|f| f.is(function, line)),
            "{function} at line {line}: {what}"
        );
        assert!(
            frames.iter().any(|f| f.function() == "pthread_create"
                || f.function().starts_with("__pthread_create")),
            "{what}"
        );
        assert!(frames.iter().any(|f| f.function() == "main"), "{what}");
    }
    // The unjoined threads' names, taken at their exit.
    assert_eq!(site(r, "start_unjoined")["description"], "unjoined");
    // Joined and detached churn is never reported.
    assert_eq!(sites(r).len(), 2, "{}", describe(r));
    let t = threads(r);
    let e = &t["events"];
    // With the raw clones, which end at their exit: no join of theirs is
    // to be seen.
    assert_eq!(e["created"], 6 * ROUNDS, "{e}");
    assert_eq!(e["raw_clone"], ROUNDS, "{e}");
    assert_eq!(e["joined"], ROUNDS, "{e}");
    assert_eq!(e["detached"], 2 * ROUNDS, "{e}");
    assert_eq!(e["regs_read_errors"], 0, "{e}");
    assert_eq!(e["no_stack"], 0, "{e}");
    assert_eq!(e["table_full"], 0, "{e}");
    assert_eq!(u64_field(t, "created"), 6 * ROUNDS);
    assert_eq!(u64_field(t, "traced_alive"), ROUNDS);
    assert_eq!(u64_field(t, "exited_unjoined"), ROUNDS);
    assert_eq!(t["verdicts"]["leak"], 2, "{t}");
}

#[test]
fn launch_reports_threads_that_never_end_or_are_never_joined() {
    require_root();
    let bin = bin();
    let mut args = ARGS.to_vec();
    args.push("--fail-on-leak");
    let run = run_launch(&args, &[bin.to_str().unwrap(), "launch"]);
    // (The heap holds glibc's per-thread blocks of the threads kept: leaks
    // too, with the threads' stacks.)
    run.assert_exit(3);
    let r = &run.report;
    assert_thread_sites(r);
    let t = threads(r);
    // The main thread was there before the program ran on.
    assert_eq!(u64_field(&t["existed_at_attach"], "threads"), 1, "{t}");
    assert_eq!(u64_field(&t["existed_at_attach"], "exited"), 0, "{t}");
    assert_eq!(t["events"]["exited"], 5 * ROUNDS, "{t}");
    assert_eq!(t["events"]["exited_untracked"], 0, "{t}");
    assert_eq!(t["events"]["join_untracked"], 0, "{t}");
}

#[test]
fn attach_lists_the_threads_that_existed_apart() {
    require_root();
    let mut target = TestProcess::spawn_ready(&bin(), &["attach"]);
    let session = attach(&target, ARGS);
    target.go();
    let tally = target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let r = &run.report;
    assert_eq!(tally.get("created"), 5 * ROUNDS);
    assert_thread_sites(r);
    let t = threads(r);
    // Read while the target ran: the names it gave its threads.
    assert_eq!(site(r, "start_forever")["description"], "forever");
    // main and two threads; one of them ended, joined, while traced.
    let e = &t["existed_at_attach"];
    assert_eq!(u64_field(e, "threads"), 3, "{e}");
    assert_eq!(u64_field(e, "exited"), 1, "{e}");
    assert_eq!(e["alive"].as_array().unwrap().len(), 2, "{e}");
    assert_eq!(t["events"]["exited"], 5 * ROUNDS, "{t}");
    assert_eq!(t["events"]["exited_untracked"], 1, "{t}");
    assert_eq!(t["events"]["join_untracked"], 1, "{t}");
    // Every thread running is accounted for: before attach, or in a site.
    assert_eq!(u64_field(t, "alive"), 2 + ROUNDS, "{t}");
    target.finish_unharmed();
}

/// In its own pid namespace, clone returns the new thread's id there: the
/// threads are still followed by their host ids, from creation to join.
#[test]
fn threads_in_a_pid_namespace_are_followed_by_host_id() {
    require_root();
    let bin = bin();
    let mut target = TestProcess::spawn(
        std::path::Path::new("unshare"),
        &[
            "--pid",
            "--fork",
            "--kill-child",
            bin.to_str().unwrap(),
            "attach",
        ],
    );
    target.wait_ready();
    let pid = only_child(target.pid());
    let mut session = AttachSession::spawn(pid, ARGS, &[]);
    session.memtrace.wait_attached();
    target.go();
    target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let r = &run.report;
    assert_eq!(r.0["target"]["ns_pid"], 1);
    assert_thread_sites(r);
    let t = threads(r);
    // Four pthreads and one raw clone exit per round.
    assert_eq!(t["events"]["exited"], 5 * ROUNDS, "{t}");
    assert_eq!(u64_field(t, "alive"), 2 + ROUNDS, "{t}");
    target.close_stdin();
}

#[test]
fn text_report_shows_thread_sites_from_the_programs_own_frame() {
    require_root();
    require_memtrace();
    let bin = bin();
    let out = run_memtrace({
        let mut c = memtrace_command();
        c.args(ARGS).arg("--").arg(&bin).arg("launch");
        c
    });
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
    let text = &out.stdout;
    let part = text
        .split("\nTHREADS:")
        .nth(1)
        .unwrap_or_else(|| panic!("no THREADS part:\n{text}"));
    let lines: Vec<&str> = part.lines().collect();
    // Each site's headline, then its stack as a heap site's reads: the
    // program's own function first, marked; pthread_create and clone3
    // folded under it.
    let mut seen = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let is_site = l.starts_with("  ") && l.contains(" (12 created");
        if !is_site {
            continue;
        }
        let first = lines.get(i + 1).copied().unwrap_or_default();
        let function = ["start_forever", "start_unjoined"]
            .into_iter()
            .find(|f| first.starts_with(&format!("    ▸ {f} at ")))
            .unwrap_or_else(|| panic!("site `{l}`: first frame line `{first}`:\n{part}"));
        let line = source_line("thread_sites", function);
        assert!(
            first.ends_with(&format!("thread_sites.c:{line}")),
            "{first}:\n{part}"
        );
        let fold = lines.get(i + 2).copied().unwrap_or_default();
        assert!(
            fold.starts_with("      … created through ") && fold.contains("pthread_create"),
            "{fold}:\n{part}"
        );
        seen.push(function);
    }
    seen.sort_unstable();
    assert_eq!(seen, ["start_forever", "start_unjoined"], "{part}");
}

#[test]
fn no_resources_traces_no_thread() {
    require_root();
    let bin = bin();
    let run = run_launch(&["--no-resources"], &[bin.to_str().unwrap(), "launch"]);
    run.assert_exit(0);
    assert_eq!(run.report.0["resources"], Value::Null);
}

// ---- a Python service ---------------------------------------------------------------

const REQUESTS: u64 = 16;

/// The line of the unique `# @marker` comment of py_service.py.
fn py_line(marker: &str) -> u64 {
    let text = std::fs::read_to_string(fixtures_dir().join("py_service.py")).unwrap();
    let needle = format!("# @{marker}");
    let hits: Vec<u64> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_end().ends_with(&needle))
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert_eq!(hits.len(), 1, "{needle}: {hits:?}");
    hits[0]
}

/// Whether a site's frames hold the Python frame `function` at `line`.
fn has_python_frame(site: &Value, function: &str, line: u64) -> bool {
    site["frames"].as_array().is_some_and(|a| {
        a.iter().any(|f| {
            f["kind"] == "python" && f["function"] == function && f["line"].as_u64() == Some(line)
        })
    })
}

#[test]
fn a_python_service_leaking_a_thread_and_a_connection_per_request_is_named_by_line() {
    require_root();
    let python = std::path::Path::new("/usr/bin/python3");
    if !python.is_file() {
        eprintln!("note: no /usr/bin/python3: skipped");
        return;
    }
    let script = fixtures_dir().join("py_service.py");
    let mut target = TestProcess::spawn(python, &[script.to_str().unwrap()]);
    target.wait_ready();
    let mut session = AttachSession::spawn(target.pid(), ARGS, &[]);
    session.memtrace.wait_attached();
    target.go();
    let tally = target.wait_done();
    let run = session.stop(libc::SIGINT);
    target.finish_unharmed();
    run.assert_exit(0);
    assert_eq!(tally.get("requests"), REQUESTS);
    let r = &run.report;
    let line = py_line("leak_thread");
    let leaked: Vec<&Value> = sites(r)
        .iter()
        .filter(|s| has_python_frame(s, "Handler.do_GET", line))
        .collect();
    assert_eq!(leaked.len(), 1, "do_GET:{line}:\n{}", describe(r));
    let s = leaked[0];
    assert_eq!(u64_field(s, "alive"), REQUESTS, "{}", describe(r));
    assert_eq!(u64_field(s, "created"), REQUESTS, "{}", describe(r));
    assert_eq!(s["verdict"], "leak", "{}", describe(r));
    // The server's own thread per request ends: never reported.
    assert_eq!(
        u64_field(threads(r), "traced_alive"),
        REQUESTS,
        "{}",
        describe(r)
    );
    // The connections: a socket per request at the handler's line, to the
    // backend.
    let line = py_line("leak_conn");
    let fd_sites: Vec<&Value> = r.0["resources"]["fds"]["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| has_python_frame(s, "Handler.do_GET", line))
        .collect();
    assert_eq!(
        fd_sites.len(),
        1,
        "do_GET:{line}: {}",
        r.0["resources"]["fds"]
    );
    let c = fd_sites[0];
    assert_eq!(u64_field(c, "outstanding"), REQUESTS, "{c}");
    assert_eq!(c["kind"], "socket", "{c}");
    assert_eq!(
        c["description"],
        format!("TCP 127.0.0.1:{} ESTABLISHED", tally.get("backend")),
        "{c}"
    );
    assert_eq!(c["verdict"], "leak", "{c}");
}
