//! Targets in containers: a process in its own mount and pid namespaces
//! (`unshare`), run from a path that exists only in its mount namespace, traced
//! by its host pid and, in launch mode, through the exec chain into its mount
//! namespace; and a chrooted one. Every leak is reported with its real stack,
//! and the report gives the pid the process sees beside the host's.
//!
//! The program's path inside the namespace is on a tmpfs mounted over a host
//! directory that is empty, or holds another program of the same name:
//! memtrace reading the host's file by that path would find nothing, or
//! symbolize the wrong program.

use memtrace_tests::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn app() -> PathBuf {
    build_fixture("exec_app", Variant::NoFramePointers)
}

/// A directory for one test, under target/, removed on drop; the namespace
/// mounts a tmpfs over it.
struct Dir(PathBuf);

impl Dir {
    /// Empty on the host: the app's path exists only in the namespace.
    fn empty() -> Dir {
        let dir = unique_path("ns");
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    /// Holding `app` on the host too, a decoy: another program.
    fn with_decoy() -> Dir {
        let dir = Dir::empty();
        let decoy = build_fixture("exec_after", Variant::NoFramePointers);
        std::fs::copy(decoy, dir.0.join("app")).unwrap();
        dir
    }

    fn app(&self) -> String {
        self.0.join("app").display().to_string()
    }

    /// Shell commands that mount a tmpfs over the directory (in the mount
    /// namespace `unshare` made: private, the host never sees it) and put
    /// the real program there.
    fn mount_app(&self) -> String {
        let d = self.0.display();
        format!(
            "mount -t tmpfs memtrace-test {d} && cp {} {d}/app",
            app().display()
        )
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The app's two sites, exactly, with their real frames and module (the
/// path the process sees), and nothing else outstanding.
fn assert_app_sites(r: &Report, module: &str) {
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
        let frames = Report::frames(site);
        assert_eq!(frames[0].module.as_deref(), Some(module), "{}", r.summary());
    }
    assert_eq!(r.total("outstanding_blocks"), 10, "{}", r.summary());
    assert_eq!(r.total("outstanding_bytes"), 7 * 300 + 3 * 5000);
}

/// `exec_app attach` as pid 1 of a new pid namespace, in a new mount
/// namespace, from the tmpfs; and its host pid (unshare's child).
fn start_contained(dir: &Dir) -> (TestProcess, u32) {
    let script = format!("{} && exec {} attach", dir.mount_app(), dir.app());
    let mut unshare = TestProcess::spawn(
        Path::new("unshare"),
        &[
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            &script,
        ],
    );
    unshare.wait_ready();
    let pid = only_child(unshare.pid());
    (unshare, pid)
}

#[test]
fn a_process_in_its_own_namespaces_is_traced_by_host_pid() {
    require_root();
    require_memtrace();
    let dir = Dir::with_decoy();
    let (mut target, pid) = start_contained(&dir);
    let mut session = AttachSession::spawn(pid, &[], &[]);
    session.memtrace.wait_attached();
    assert!(
        session.memtrace.said(&format!(
            "memtrace: attached to pid {pid} (app, 1 in its pid namespace)"
        )),
        "{}",
        session.memtrace.stderr()
    );
    target.go();
    let tally = target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let r = &run.report;
    assert_app_sites(r, &dir.app());
    assert_eq!(r.total("alloc_calls"), tally.get("alloc_calls"));
    assert_eq!(r.total("alloc_bytes"), tally.get("alloc_bytes"));
    let t = &r.0["target"];
    assert_eq!(t["pid"], pid);
    assert_eq!(t["ns_pid"], 1, "{t}");
    assert_eq!(t["own_namespaces"], json!(["pid", "mnt"]), "{t}");
    // Its mount namespace's root is a copy of the host's `/`.
    assert_eq!(t["own_root"], false, "{t}");
    assert_eq!(t["exe"], dir.app().as_str());
    target.close_stdin();
}

/// Launch mode: `unshare --mount sh -c '... exec app'` is followed through
/// both execs into the mount namespace, where the app's path exists only.
/// (A new pid namespace takes a fork, `unshare --pid --fork`, which only
/// `--follow-forks` follows.)
#[test]
fn launch_follows_the_exec_into_a_mount_namespace() {
    require_root();
    require_memtrace();
    let dir = Dir::empty();
    let script = format!("{} && exec {} launch", dir.mount_app(), dir.app());
    let run = run_launch(&[], &["unshare", "--mount", "sh", "-c", &script]);
    run.assert_exit(0);
    let r = &run.report;
    assert_eq!(r.0["end_reason"], "target-exited", "{}", run.stderr);
    assert_app_sites(r, &dir.app());
    let tally = run.fixture_tally().expect("the app's done line");
    assert_eq!(r.total("alloc_calls"), tally.get("alloc_calls"));
    let images: Vec<&Value> = r.0["images"].as_array().unwrap().iter().collect();
    let exes: Vec<&str> = images.iter().map(|i| i["exe"].as_str().unwrap()).collect();
    assert_eq!(exes.last(), Some(&dir.app().as_str()), "{images:#?}");
    assert!(images.iter().all(|i| i["traced"] == true), "{images:#?}");
    // Traced from its first instruction: stopped at its exec.
    assert_eq!(
        images.last().unwrap()["tracing_started_after_ms"],
        Value::Null
    );
    let t = &r.0["target"];
    assert_eq!(t["own_namespaces"], json!(["mnt"]), "{t}");
    assert_eq!(t["ns_pid"], t["pid"], "{t}");
}

/// A chrooted process in memtrace's mount namespace: its maps name files as
/// memtrace sees them (`<jail>/lib/...`), not under its root.
#[test]
fn a_chrooted_process_is_traced() {
    require_root();
    require_memtrace();
    let jail = unique_path("jail");
    let lib = jail.join("lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(jail.join("lib64")).unwrap();
    std::fs::copy("/lib/x86_64-linux-gnu/libc.so.6", lib.join("libc.so.6")).unwrap();
    std::fs::copy(
        "/lib64/ld-linux-x86-64.so.2",
        jail.join("lib64/ld-linux-x86-64.so.2"),
    )
    .unwrap();
    std::fs::copy(app(), jail.join("app")).unwrap();
    let mut target = TestProcess::spawn(
        Path::new("chroot"),
        &[jail.to_str().unwrap(), "/app", "attach"],
    );
    target.wait_ready();
    let session = attach(&target, &[]);
    target.go();
    let tally = target.wait_done();
    let run = session.stop(libc::SIGINT);
    target.close_stdin();
    let _ = std::fs::remove_dir_all(&jail);
    run.assert_exit(0);
    let r = &run.report;
    assert_app_sites(r, jail.join("app").to_str().unwrap());
    assert_eq!(r.total("alloc_calls"), tally.get("alloc_calls"));
    let t = &r.0["target"];
    assert_eq!(t["own_root"], true, "{t}");
    assert_eq!(t["own_namespaces"], json!([]), "{t}");
}
