//! `--follow-forks`: a child the target forks is traced from its first
//! instruction, its blocks its own (those it inherited stay the parent's);
//! a prefork server's workers, replaced during the run, are each traced and
//! their common leak site summed over them, in launch and attach mode.

use memtrace_tests::*;
use serde_json::Value;

fn followed(r: &Report) -> &Vec<Value> {
    r.0["processes"]["followed"]
        .as_array()
        .unwrap_or_else(|| panic!("the report's processes.followed\n{}", r.0))
}

/// The entries of `processes.sites` with `function` in their frames.
fn shared_sites<'a>(r: &'a Report, function: &str) -> Vec<&'a Value> {
    r.0["processes"]["sites"]
        .as_array()
        .expect("the report's processes.sites")
        .iter()
        .filter(|s| Report::frames(s).iter().any(|f| f.function() == function))
        .collect()
}

/// The one shared site through `function` at its marked `line`, which it
/// must have in its frames.
fn shared_site<'a>(r: &'a Report, fixture: &str, function: &str) -> &'a Value {
    let found = shared_sites(r, function);
    assert_eq!(found.len(), 1, "{function}: {found:#?}");
    let line = source_line(fixture, function);
    assert!(
        Report::frames(found[0])
            .iter()
            .any(|f| f.function() == function && f.line == Some(line)),
        "{function} at line {line}: {:#?}",
        found[0]
    );
    found[0]
}

#[test]
fn launch_follows_a_forked_child() {
    require_root();
    require_memtrace();
    let app = build_fixture("exec_app", Variant::NoFramePointers);
    let run = run_launch(&["--follow-forks"], &[app.to_str().unwrap(), "fork"]);
    run.assert_exit(0);
    let r = &run.report;
    let child = run
        .stdout
        .lines()
        .find(|l| l.starts_with("child"))
        .map(Tally::parse)
        .expect("the fixture's child line")
        .get("pid");
    // The parent's four blocks, all outstanding in the parent although the
    // child freed its copies of two; none of the child's in `sites`.
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
    assert_eq!(r.total("outstanding_blocks"), 4, "{}", r.summary());
    assert_eq!(r.0["forks_not_followed"]["count"], 0, "{}", run.stderr);
    let parts = followed(r);
    assert_eq!(parts.len(), 2, "{parts:#?}\n{}", run.stderr);
    let target = u64_field(r.target(), "pid");
    assert_eq!(u64_field(&parts[0], "pid"), target);
    assert_eq!(parts[0]["parent_pid"], Value::Null);
    assert_eq!(u64_field(&parts[0], "outstanding_blocks"), 4);
    assert_eq!(u64_field(&parts[0], "inherited_frees"), 0);
    let c = &parts[1];
    assert_eq!(u64_field(c, "pid"), child, "{c:#}");
    assert_eq!(u64_field(c, "parent_pid"), target);
    assert_eq!(c["ended_by"], "exited");
    assert_eq!(c["tracing_started_after_ms"], Value::Null);
    // Traced from its first instruction: its 400 allocations exactly, and
    // the two blocks it inherited and freed, apart.
    assert_eq!(u64_field(c, "alloc_calls"), 400, "{c:#}");
    assert_eq!(u64_field(c, "outstanding_blocks"), 400, "{c:#}");
    assert_eq!(u64_field(c, "outstanding_bytes"), 400_000);
    assert_eq!(u64_field(c, "inherited_frees"), 2, "{c:#}");
    let leak = shared_site(r, "exec_app", "child_leak");
    assert_eq!(u64_field(leak, "processes"), 1);
    assert_eq!(leak["pids"], serde_json::json!([child]));
    assert_eq!(u64_field(leak, "outstanding_blocks"), 400);
    assert_eq!(u64_field(leak, "outstanding_bytes"), 400_000);
    let parent = shared_site(r, "exec_app", "parent_leak");
    assert_eq!(parent["pids"], serde_json::json!([target]));
    assert_eq!(u64_field(parent, "outstanding_blocks"), 4);
}

/// The master's and each worker's part, and the leak site summed over the
/// four workers, which were replaced while traced.
fn assert_prefork(r: &Report, prefork: &std::path::Path, stderr: &str) {
    let master = u64_field(r.target(), "pid");
    r.assert_outstanding(
        &[
            At("master_leak", Some(source_line("prefork", "master_leak"))),
            At("serve", None),
            At("main", None),
        ],
        1,
        100,
    );
    r.assert_no_frame("a worker's", |f| f == "request_leak" || f == "worker");
    assert_eq!(r.0["forks_not_followed"]["count"], 0, "{stderr}");
    let parts = followed(r);
    assert_eq!(parts.len(), 5, "{parts:#?}\n{stderr}");
    let mut workers: Vec<u64> = Vec::new();
    for w in &parts[1..] {
        assert_eq!(u64_field(w, "parent_pid"), master, "{w:#}");
        assert_eq!(w["ended_by"], "exited", "{w:#}");
        assert_eq!(w["exe"], prefork.to_str().unwrap());
        assert_eq!(u64_field(w, "outstanding_blocks"), 5, "{w:#}");
        assert_eq!(u64_field(w, "outstanding_bytes"), 5 * 2000, "{w:#}");
        // Five requests: a buffer and a leaked block each.
        assert_eq!(u64_field(w, "alloc_calls"), 10, "{w:#}");
        assert_eq!(u64_field(w, "inherited_frees"), 0, "{w:#}");
        workers.push(u64_field(w, "pid"));
    }
    workers.sort_unstable();
    let leak = shared_site(r, "prefork", "request_leak");
    assert_eq!(u64_field(leak, "processes"), 4, "{leak:#}");
    let mut pids: Vec<u64> = leak["pids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    pids.sort_unstable();
    assert_eq!(pids, workers);
    assert_eq!(u64_field(leak, "outstanding_blocks"), 20);
    assert_eq!(u64_field(leak, "outstanding_bytes"), 20 * 2000);
    assert_eq!(leak["exe"], prefork.to_str().unwrap());
    // The buffer each request frees is no site of any process.
    assert!(
        shared_sites(r, "handle").len() == 1,
        "{:#}",
        r.0["processes"]
    );
}

#[test]
fn launch_follows_a_prefork_servers_workers() {
    require_root();
    require_memtrace();
    let prefork = build_fixture("prefork", Variant::NoFramePointers);
    let run = run_launch(&["--follow-forks"], &[prefork.to_str().unwrap(), "launch"]);
    run.assert_exit(0);
    let workers: Vec<u64> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("worker"))
        .map(|l| Tally::parse(l).get("pid"))
        .collect();
    assert_eq!(workers.len(), 4, "{}", run.stdout);
    assert_prefork(&run.report, &prefork, &run.stderr);
    let parts = followed(&run.report);
    let mut seen: Vec<u64> = parts[1..].iter().map(|w| u64_field(w, "pid")).collect();
    let mut printed = workers.clone();
    seen.sort_unstable();
    printed.sort_unstable();
    assert_eq!(seen, printed);
}

#[test]
fn attach_follows_a_prefork_servers_workers() {
    require_root();
    require_memtrace();
    let prefork = build_fixture("prefork", Variant::NoFramePointers);
    let mut target = TestProcess::spawn(&prefork, &["attach"]);
    target.wait_ready();
    let session = attach(&target, &["--follow-forks"]);
    target.go();
    target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    assert_prefork(&run.report, &prefork, &run.stderr);
    target.close_stdin();
}

/// A child that execs (dash forks for a command that is not its last) goes
/// through the exec path for that process alone: stopped at its exec,
/// attached to at its loader's stops, so the app is traced from its first
/// instruction; the shell's own sites stay the shell's.
#[test]
fn a_child_that_execs_is_traced_as_its_new_program() {
    require_root();
    require_memtrace();
    let app = build_fixture("exec_app", Variant::NoFramePointers);
    let cmd = format!("{} launch; true", app.display());
    let run = run_launch(&["--follow-forks"], &["sh", "-c", &cmd]);
    run.assert_exit(0);
    let r = &run.report;
    r.assert_no_frame("the app's", |f| f == "app_leak" || f == "work");
    let parts = followed(r);
    assert_eq!(parts.len(), 3, "{parts:#?}\n{}", run.stderr);
    let target = u64_field(r.target(), "pid");
    let (sh, app_part) = (&parts[1], &parts[2]);
    assert_eq!(u64_field(sh, "parent_pid"), target, "{sh:#}");
    assert_eq!(sh["ended_by"], "exec", "{sh:#}");
    assert_eq!(u64_field(app_part, "pid"), u64_field(sh, "pid"));
    assert_eq!(app_part["exe"], app.to_str().unwrap(), "{app_part:#}");
    assert_eq!(app_part["ended_by"], "exited", "{app_part:#}");
    assert_eq!(app_part["tracing_started_after_ms"], Value::Null);
    let tally = run.fixture_tally().expect("the app's done line");
    assert_eq!(
        u64_field(app_part, "alloc_calls"),
        tally.get("alloc_calls"),
        "{app_part:#}"
    );
    assert_eq!(
        u64_field(app_part, "outstanding_blocks"),
        10,
        "{app_part:#}"
    );
    assert_eq!(u64_field(app_part, "outstanding_bytes"), 7 * 300 + 3 * 5000);
    let leak = shared_site(r, "exec_app", "app_leak");
    assert_eq!(u64_field(leak, "processes"), 1);
    assert_eq!(u64_field(leak, "outstanding_blocks"), 7);
}
