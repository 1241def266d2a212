//! Python targets: leaks named by Python function, file and line, on each
//! CPython installed (pyenv's shared-libpython builds 3.10 to 3.13 and
//! Debian's static, stripped, LTO `/usr/bin/python3.11`), launched and
//! attached to.
//!
//! The fixture `py_leaks.py` runs under `PYTHONMALLOC=malloc`, so every
//! allocation of the interpreter goes through libc and the counts are exact.
//! A CPython that is not installed is skipped with a note; the test fails if
//! none is.

use std::path::{Path, PathBuf};

use memtrace_tests::*;
use serde_json::Value;

const N: u64 = 64;
/// `sizeof(PyBytesObject)` up to its data, plus the terminating NUL.
const BYTES_HEADER: u64 = 33;
const CACHE_SIZE: u64 = 10000;
const GEN_SIZE: u64 = 12000;
const C_SIZE: u64 = 7000;

/// Launched, the interpreter's start runs module code once, line after
/// line: tens of thousands of distinct stacks (3.11.7 makes 44,000 of its
/// 89,000 allocations' stacks), more than the default `--max-stacks`.
const LAUNCH_ARGS: &[&str] = &["--max-stacks", "262144"];

fn fixture() -> PathBuf {
    fixtures_dir().join("py_leaks.py")
}

/// The line of the unique `# @marker` comment of the fixture.
fn line_of(marker: &str) -> u32 {
    let text = std::fs::read_to_string(fixture()).expect("reading py_leaks.py");
    let needle = format!("# @{marker}");
    let hits: Vec<u32> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_end().ends_with(&needle))
        .map(|(i, _)| i as u32 + 1)
        .collect();
    assert_eq!(hits.len(), 1, "marker {needle} in py_leaks.py: {hits:?}");
    hits[0]
}

/// pyenv's interpreter of version `v` (`3.12.1`), if installed.
fn pyenv(v: &str) -> Option<PathBuf> {
    let minor = v.rsplit_once('.').map_or(v, |(m, _)| m);
    let roots = [
        std::env::var_os("PYENV_ROOT").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")),
        Some(PathBuf::from("/root/.pyenv")),
    ];
    roots
        .into_iter()
        .flatten()
        .map(|r| {
            r.join("versions")
                .join(v)
                .join("bin")
                .join(format!("python{minor}"))
        })
        .find(|p| p.is_file())
}

/// Every interpreter the tests run on: (name, path).
fn interpreters() -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for v in ["3.10.13", "3.11.7", "3.12.1", "3.13.0"] {
        match pyenv(v) {
            Some(p) => found.push((format!("pyenv {v}"), p)),
            None => eprintln!("note: pyenv CPython {v} not installed: skipped"),
        }
    }
    let debian = PathBuf::from("/usr/bin/python3.11");
    if debian.is_file() {
        found.push(("Debian /usr/bin/python3.11".into(), debian));
    } else {
        eprintln!("note: /usr/bin/python3.11 not installed: skipped");
    }
    assert!(!found.is_empty(), "no CPython 3.10-3.13 installed");
    found
}

/// Where the kernel's return-probe trampoline is mapped. When another
/// tracer (another memtrace on this machine: a uprobe is shared by every
/// consumer of the same file offset) arms a return probe on the allocator,
/// the return address the native walk reads is this trampoline's, and the
/// native frames past it are lost; the Python frames are not (they come
/// from the interpreter's state, not the stack).
const URETPROBE_TRAMPOLINE: &str = "0x7fffffffe000";

/// Whether a site's native walk ran into another tracer's return probe.
fn native_walk_hijacked(site: &Value) -> bool {
    site["frames"].as_array().is_some_and(|a| {
        a.iter()
            .any(|f| f["address"].as_str() == Some(URETPROBE_TRAMPOLINE))
    })
}

fn kind(f: &Value) -> &str {
    f.get("kind").and_then(Value::as_str).unwrap_or("?")
}

/// A site's Python frames, innermost first: (function, line).
fn python_frames(site: &Value) -> Vec<(String, Option<u64>)> {
    site["frames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|f| kind(f) == "python")
                .map(|f| {
                    (
                        f["function"].as_str().unwrap_or("?").to_string(),
                        f["line"].as_u64(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The sites whose innermost Python frame is `function` at `line` and whose
/// blocks are all of `size` bytes.
fn sites_of<'a>(r: &'a Report, function: &str, line: u32, size: u64) -> Vec<&'a Value> {
    r.sites()
        .iter()
        .filter(|s| {
            python_frames(s).first() == Some(&(function.to_string(), Some(line as u64)))
                && Report::bytes(s) == Report::blocks(s) * size
        })
        .collect()
}

/// Python summary of the report for assertion messages.
fn py_summary(r: &Report) -> String {
    let mut out = String::new();
    for s in r.sites() {
        let py: Vec<String> = python_frames(s)
            .iter()
            .map(|(f, l)| format!("{f}:{}", l.map_or("?".into(), |l| l.to_string())))
            .collect();
        out.push_str(&format!(
            "  {} blocks {} bytes  native {}  python {}\n",
            Report::blocks(s),
            Report::bytes(s),
            s["frames"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|f| kind(f) == "native").count()),
            py.join(" < ")
        ));
    }
    format!("{}\n{out}", r.0["drops"])
}

/// A function's name as the interpreter `what` names it: 3.10's code
/// objects have no qualified name (`Thread.run` is `run`).
fn named(what: &str, qualname: &str) -> String {
    if what.contains(" 3.10.") {
        qualname.rsplit('.').next().unwrap_or(qualname).to_string()
    } else {
        qualname.to_string()
    }
}

/// One leak: exactly N blocks of `size` at the line, in sites whose next
/// Python frame is `caller`.
fn assert_leak(r: &Report, what: &str, (function, line): (&str, u32), size: u64, caller: &str) {
    let caller = named(what, caller);
    let sites = sites_of(r, function, line, size);
    let blocks: u64 = sites.iter().map(|s| Report::blocks(s)).sum();
    let bytes: u64 = sites.iter().map(|s| Report::bytes(s)).sum();
    assert_eq!(
        (blocks, bytes),
        (N, N * size),
        "{what}: {function}:{line}, sites:\n{}",
        py_summary(r)
    );
    for s in &sites {
        let py = python_frames(s);
        assert_eq!(
            py.get(1).map(|f| f.0.as_str()),
            Some(caller.as_str()),
            "{what}: caller of {function}: {py:?}"
        );
        let file = s["frames"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| kind(f) == "python")
            .and_then(|f| f["file"].as_str())
            .unwrap_or("");
        assert!(file.ends_with("py_leaks.py"), "{what}: file {file}");
    }
}

fn assert_python_leaks(r: &Report, what: &str) {
    fn r2(f: &str) -> (&str, u32) {
        (f, line_of(f))
    }
    assert_leak(r, what, r2("cache_put"), BYTES_HEADER + CACHE_SIZE, "work");
    assert_leak(r, what, r2("chunks"), BYTES_HEADER + GEN_SIZE, "consume");
    // malloc called by ctypes on another thread, the GIL released: the
    // native frames of the call (libffi's) come before the Python ones.
    assert_leak(r, what, r2("c_leak"), C_SIZE, "Thread.run");
    for s in sites_of(r, "c_leak", line_of("c_leak"), C_SIZE) {
        let frames = s["frames"].as_array().unwrap();
        assert_eq!(kind(&frames[0]), "native", "{what}: {s}");
    }
    // The callers of the cache's line, by line.
    let cache = sites_of(
        r,
        "cache_put",
        line_of("cache_put"),
        BYTES_HEADER + CACHE_SIZE,
    );
    assert_eq!(
        python_frames(cache[0]).get(1),
        Some(&("work".to_string(), Some(line_of("work_cache") as u64)))
    );
    let unresolved = &r.0["drops"]["unresolved_frames"];
    assert!(
        unresolved.get("python_code_unreadable").is_none(),
        "{what}: {unresolved}"
    );
    assert_eq!(r.total("dropped_events"), 0, "{what}: {}", r.summary());
}

#[test]
fn python_leaks_are_named_by_line_on_each_interpreter_launched() {
    require_root();
    require_memtrace();
    let script = fixture();
    for (name, python) in interpreters() {
        let run = run_launch_env(
            LAUNCH_ARGS,
            &[python.to_str().unwrap(), script.to_str().unwrap()],
            &[("PYTHONMALLOC", "malloc")],
        );
        run.assert_exit(0);
        assert!(
            run.stderr.contains("stacks show Python frames"),
            "{name}: {}",
            run.stderr
        );
        assert_python_leaks(&run.report, &name);
        // Under PYTHONMALLOC=malloc nothing is unseen.
        assert_eq!(
            run.report.0["untraced_entry_points"],
            serde_json::json!([]),
            "{name}"
        );
    }
}

#[test]
fn python_leaks_are_named_in_a_running_interpreter() {
    require_root();
    require_memtrace();
    let script = fixture();
    for (name, python) in interpreters() {
        let mut target = TestProcess::spawn(&python, &[script.to_str().unwrap(), "attach"]);
        target.wait_ready();
        let session = AttachSession::spawn(target.pid(), &[], &[]);
        let mut session = session;
        session.memtrace.wait_attached();
        target.go();
        target.wait_done();
        let run = session.stop(libc::SIGINT);
        target.finish_unharmed();
        run.assert_exit(0);
        let what = format!("{name}, attached");
        assert_python_leaks(&run.report, &what);
        // Started without PYTHONMALLOC=malloc: pymalloc's objects are not
        // seen, and the report says so.
        let unseen: Vec<&str> = run.report.0["untraced_entry_points"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|u| u["name"].as_str())
            .collect();
        assert_eq!(unseen, ["PyMem_Malloc", "PyObject_Malloc"], "{what}");
        assert!(run.stderr.contains("(pymalloc) are not traced"), "{what}");
        // ctypes was loaded before memtrace came: its frames are named.
        for s in sites_of(&run.report, "c_leak", line_of("c_leak"), C_SIZE) {
            if native_walk_hijacked(s) {
                eprintln!("note: {what}: another tracer's return probe cut the native frames");
                continue;
            }
            assert!(
                s["frames"].as_array().unwrap().iter().any(|f| f["function"]
                    .as_str()
                    .is_some_and(|n| n.contains("ffi_call"))),
                "{what}: no libffi frame in {s}"
            );
        }
    }
}

/// In its own pid namespace a CPython records its threads' ids there
/// (`native_thread_id`), which the BPF side never sees: its threads are
/// matched by `pthread_self()` instead, and the frames are all there.
#[test]
fn a_python_service_in_a_pid_namespace_shows_python_frames() {
    require_root();
    require_memtrace();
    let script = fixture();
    for (name, python) in interpreters() {
        let mut target = TestProcess::spawn_env(
            Path::new("unshare"),
            &[
                "--pid",
                "--fork",
                "--kill-child",
                python.to_str().unwrap(),
                script.to_str().unwrap(),
                "attach",
            ],
            &[("PYTHONMALLOC", "malloc")],
        );
        target.wait_ready();
        let pid = only_child(target.pid());
        let mut session = AttachSession::spawn(pid, &[], &[]);
        session.memtrace.wait_attached();
        target.go();
        target.wait_done();
        let run = session.stop(libc::SIGINT);
        target.finish_unharmed();
        run.assert_exit(0);
        let what = format!("{name}, in a pid namespace");
        assert_eq!(run.report.0["target"]["ns_pid"], 1, "{what}");
        assert_python_leaks(&run.report, &what);
    }
}

#[test]
fn python_native_frames_are_shown_between_python_frames_on_request() {
    require_root();
    require_memtrace();
    let Some(python) = pyenv("3.12.1") else {
        eprintln!("note: pyenv CPython 3.12.1 not installed: skipped");
        return;
    };
    let script = fixture();
    let run = run_launch_env(
        &["--python-native-frames", "--max-stacks", "262144"],
        &[python.to_str().unwrap(), script.to_str().unwrap()],
        &[("PYTHONMALLOC", "malloc")],
    );
    run.assert_exit(0);
    let r = &run.report;
    assert_python_leaks(r, "--python-native-frames");
    let cache = sites_of(
        r,
        "cache_put",
        line_of("cache_put"),
        BYTES_HEADER + CACHE_SIZE,
    );
    if native_walk_hijacked(cache[0]) {
        eprintln!("note: another tracer's return probe cut the native frames: not checked");
        return;
    }
    let frames = cache[0]["frames"].as_array().unwrap();
    // The C code that allocated, then the Python frames one run of the
    // evaluation loop ran (3.11+ calls Python from Python without a C
    // frame), then that loop's native frame and the interpreter's callers.
    let at = |name: &str| {
        frames
            .iter()
            .position(|f| f["function"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in {frames:?}"))
    };
    let eval = at("_PyEval_EvalFrameDefault");
    assert_eq!(at("bytes_repeat"), 0, "{frames:?}");
    assert!(
        at("cache_put") < at("work") && at("work") < eval,
        "{frames:?}"
    );
    assert!(eval < at("Py_RunMain"), "{frames:?}");
    assert_eq!(
        cache[0].get("native_frames_folded"),
        Some(&Value::from(false))
    );
}

#[test]
fn python_before_3_10_is_named_and_traced_natively() {
    require_root();
    require_memtrace();
    let Some(python) = pyenv("3.9.18") else {
        eprintln!("note: pyenv CPython 3.9.18 not installed: skipped");
        return;
    };
    let script = fixture();
    let run = run_launch_env(
        LAUNCH_ARGS,
        &[python.to_str().unwrap(), script.to_str().unwrap()],
        &[("PYTHONMALLOC", "malloc")],
    );
    run.assert_exit(0);
    assert!(run.stderr.contains("CPython before 3.10"), "{}", run.stderr);
    let r = &run.report;
    assert!(r.sites().iter().all(|s| python_frames(s).is_empty()));
    // The C leak is still there, by its native stacks.
    let blocks: u64 = r
        .sites()
        .iter()
        .filter(|s| Report::bytes(s) == Report::blocks(s) * C_SIZE)
        .map(Report::blocks)
        .sum();
    assert_eq!(blocks, N, "{}", r.summary());
}

/// A C program that links pyenv's `libpython3.12.so` and calls
/// py_leaks.py's `work()` from C: the interpreter is found in the library,
/// the leaks named by line, launched and attached to.
#[test]
fn python_leaks_are_named_in_a_program_that_embeds_libpython() {
    require_root();
    require_memtrace();
    let Some(python) = pyenv("3.12.1") else {
        eprintln!("note: pyenv CPython 3.12.1 not installed: skipped");
        return;
    };
    let prefix = python.parent().and_then(Path::parent).unwrap();
    let (include, lib) = (prefix.join("include/python3.12"), prefix.join("lib"));
    let flags = [
        format!("-I{}", include.display()),
        format!("-L{}", lib.display()),
        format!("-Wl,-rpath,{}", lib.display()),
        "-lpython3.12".to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let bin = build_fixture_with("py_embed", Variant::FramePointers, Some("py312"), &flags);
    let dir = fixtures_dir();
    let dir = dir.to_str().unwrap();

    let run = run_launch_env(
        LAUNCH_ARGS,
        &[bin.to_str().unwrap(), dir],
        &[("PYTHONMALLOC", "malloc")],
    );
    run.assert_exit(0);
    assert!(
        run.stderr.contains("Python 3.12.1 in ") && run.stderr.contains("libpython3.12.so"),
        "{}",
        run.stderr
    );
    assert_python_leaks(&run.report, "embedded 3.12.1");
    // work() is the outermost Python frame: C called it.
    for s in sites_of(
        &run.report,
        "cache_put",
        line_of("cache_put"),
        BYTES_HEADER + CACHE_SIZE,
    ) {
        let py = python_frames(s);
        assert_eq!(py.len(), 2, "{py:?}");
    }

    let mut target = TestProcess::spawn_env(&bin, &[dir, "attach"], &[("PYTHONMALLOC", "malloc")]);
    target.wait_ready();
    let mut session = AttachSession::spawn(target.pid(), &[], &[]);
    session.memtrace.wait_attached();
    target.go();
    target.wait_done();
    let run = session.stop(libc::SIGINT);
    target.finish_unharmed();
    run.assert_exit(0);
    assert_python_leaks(&run.report, "embedded 3.12.1, attached");
}

/// The same work, once under memtrace and once under tracemalloc (in the
/// process, from its start): outstanding bytes per leaking Python line agree
/// within 10%.
#[test]
fn python_lines_agree_with_tracemalloc() {
    require_root();
    require_memtrace();
    let script = fixture();
    for (name, python) in interpreters() {
        let out = std::process::Command::new(&python)
            .args([script.to_str().unwrap(), "tracemalloc"])
            .output()
            .expect("running the fixture under tracemalloc");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("tracemalloc"))
            .unwrap_or_else(|| panic!("{name}: no tracemalloc line in {stdout:?}"));
        let traced = Tally::parse(line);
        let run = run_launch_env(
            LAUNCH_ARGS,
            &[python.to_str().unwrap(), script.to_str().unwrap()],
            &[("PYTHONMALLOC", "malloc")],
        );
        run.assert_exit(0);
        let r = &run.report;
        for leak in ["cache_put", "chunks"] {
            let at = line_of(leak);
            let ours: u64 = r
                .sites()
                .iter()
                .filter(|s| {
                    python_frames(s).first().map(|f| (f.0.as_str(), f.1))
                        == Some((leak, Some(at as u64)))
                })
                .map(Report::bytes)
                .sum();
            let theirs = traced.get(&at.to_string());
            let ratio = ours as f64 / theirs as f64;
            assert!(
                (0.9..=1.1).contains(&ratio),
                "{name}: {leak} (line {at}): memtrace {ours} B, tracemalloc {theirs} B"
            );
        }
    }
}

// ---- pymalloc's small objects (`--python-objects`) ---------------------------

/// `py_objects.py`'s sizes (see its docstring).
const OBJ_N: u64 = 64;
const OBJ_K: u64 = 200;
const OBJ_SMALL: u64 = BYTES_HEADER + 100;
const OBJ_LARGE: u64 = BYTES_HEADER + 600;
const OBJ_LINES: [&str; 3] = ["small_bytes", "small_tuples", "large_bytes"];

fn objects_fixture() -> PathBuf {
    fixtures_dir().join("py_objects.py")
}

/// The line of py_objects.py's unique `# @marker` comment.
fn objects_line(marker: &str) -> u64 {
    let text = std::fs::read_to_string(objects_fixture()).expect("reading py_objects.py");
    let needle = format!("# @{marker}");
    let hits: Vec<u64> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_end().ends_with(&needle))
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert_eq!(hits.len(), 1, "marker {needle} in py_objects.py: {hits:?}");
    hits[0]
}

/// The innermost Python frame of a site, if it is py_objects.py's:
/// (function, line).
fn objects_frame(s: &Value) -> Option<(String, u64)> {
    let f = s["frames"]
        .as_array()?
        .iter()
        .find(|f| kind(f) == "python")?;
    f["file"].as_str()?.ends_with("py_objects.py").then(|| {
        (
            f["function"].as_str().unwrap_or("?").to_string(),
            f["line"].as_u64().unwrap_or(0),
        )
    })
}

/// The sites whose innermost Python frame is py_objects.py's `line`.
fn object_sites(r: &Report, line: u64) -> Vec<&Value> {
    r.sites()
        .iter()
        .filter(|s| objects_frame(s).is_some_and(|(_, l)| l == line))
        .collect()
}

/// The sites whose innermost Python frame is in py_objects.py's `function`.
fn function_sites<'a>(r: &'a Report, function: &str) -> Vec<&'a Value> {
    r.sites()
        .iter()
        .filter(|s| objects_frame(s).is_some_and(|(f, _)| f == function))
        .collect()
}

/// Outstanding (blocks, bytes) per marked line.
fn object_tally(r: &Report) -> Vec<(&'static str, u64, u64)> {
    OBJ_LINES
        .iter()
        .map(|&m| {
            let sites = object_sites(r, objects_line(m));
            (
                m,
                sites.iter().map(|s| Report::blocks(s)).sum(),
                sites.iter().map(|s| Report::bytes(s)).sum(),
            )
        })
        .collect()
}

/// Outstanding (blocks, bytes) per function of the marked lines.
fn function_tally(r: &Report) -> Vec<(&'static str, u64, u64)> {
    OBJ_LINES
        .iter()
        .map(|&f| {
            let sites = function_sites(r, f);
            (
                f,
                sites.iter().map(|s| Report::blocks(s)).sum(),
                sites.iter().map(|s| Report::bytes(s)).sum(),
            )
        })
        .collect()
}

/// Blocks of exactly `size` bytes made in `function` (sites whose blocks
/// all have that size).
fn blocks_of(r: &Report, function: &str, size: u64) -> u64 {
    function_sites(r, function)
        .iter()
        .filter(|s| Report::bytes(s) == Report::blocks(s) * size)
        .map(|s| Report::blocks(s))
        .sum()
}

/// What a pymalloc run must show whatever else: every small bytes object,
/// every large one once, nothing dropped, nothing untraced.
fn assert_objects_complete(r: &Report, what: &str) {
    assert_eq!(
        blocks_of(r, "small_bytes", OBJ_SMALL),
        OBJ_N * OBJ_K,
        "{what}: {:?}\n{}",
        object_tally(r),
        py_summary(r)
    );
    // pymalloc hands these to malloc: one block each, not two.
    let large = function_sites(r, "large_bytes");
    let (blocks, bytes) = large.iter().fold((0, 0), |(b, n), s| {
        (b + Report::blocks(s), n + Report::bytes(s))
    });
    assert_eq!((blocks, bytes), (OBJ_N, OBJ_N * OBJ_LARGE), "{what}");
    assert_eq!(
        r.0["untraced_entry_points"],
        serde_json::json!([]),
        "{what}: pymalloc is traced"
    );
    assert_eq!(r.total("dropped_events"), 0, "{what}: {}", r.summary());
}

/// As deployed (pymalloc, no restart), `--python-objects` sees every small
/// object: per leaking line, the same blocks and bytes as the same run under
/// `PYTHONMALLOC=malloc`, where every allocation goes through libc; a block
/// above 512 bytes, which pymalloc hands to malloc, is counted once.
#[test]
fn python_objects_are_exact_without_a_restart() {
    require_root();
    require_memtrace();
    let script = objects_fixture();
    let script = script.to_str().unwrap();
    let mut ran = 0;
    for v in ["3.10.13", "3.11.7", "3.12.1", "3.13.0"] {
        let Some(python) = pyenv(v) else {
            eprintln!("note: pyenv CPython {v} not installed: skipped");
            continue;
        };
        let python = python.to_str().unwrap();
        let under_malloc = run_launch_env(
            LAUNCH_ARGS,
            &[python, script],
            &[("PYTHONMALLOC", "malloc")],
        );
        under_malloc.assert_exit(0);
        let mut args = LAUNCH_ARGS.to_vec();
        args.push("--python-objects");
        let run = run_launch_env(&args, &[python, script], &[]);
        run.assert_exit(0);
        assert!(
            run.stderr.contains("(pymalloc) are traced"),
            "{v}: {}",
            run.stderr
        );
        assert_objects_complete(&run.report, v);
        let expected = function_tally(&under_malloc.report);
        assert_eq!(function_tally(&run.report), expected, "{v}");
        assert!(expected[1].1 >= OBJ_N * OBJ_K * 2, "{v}: {expected:?}");
        assert_eq!(
            object_tally(&run.report),
            object_tally(&under_malloc.report),
            "{v}"
        );
        ran += 1;
    }
    assert!(ran > 0, "no pyenv CPython 3.10-3.13 installed");
}

/// The same, attached to an interpreter that was already running; and
/// under pymalloc's debug hooks (`PYTHONMALLOC=pymalloc_debug`), where
/// `--python-objects` does not apply and the report says so.
#[test]
fn python_objects_attached_and_under_debug_hooks() {
    require_root();
    require_memtrace();
    let Some(python) = pyenv("3.12.1") else {
        eprintln!("note: pyenv CPython 3.12.1 not installed: skipped");
        return;
    };
    let script = objects_fixture();
    let script = script.to_str().unwrap();
    let under_malloc = run_launch_env(
        LAUNCH_ARGS,
        &[python.to_str().unwrap(), script],
        &[("PYTHONMALLOC", "malloc")],
    );
    under_malloc.assert_exit(0);

    let mut target = TestProcess::spawn(&python, &[script, "attach"]);
    target.wait_ready();
    let mut session = AttachSession::spawn(target.pid(), &["--python-objects"], &[]);
    session.memtrace.wait_attached();
    target.go();
    target.wait_done();
    let run = session.stop(libc::SIGINT);
    target.finish_unharmed();
    run.assert_exit(0);
    assert_objects_complete(&run.report, "attached");
    assert_eq!(
        object_tally(&run.report),
        object_tally(&under_malloc.report),
        "attached"
    );

    // Under the debug hooks pymalloc is not traced (a large block would
    // reach malloc through the raw allocator's hooks, not from pymalloc,
    // and be counted twice), and the report says so. A large block is seen
    // once, at malloc, with the object's and the raw allocator's hooks'
    // two words before it and one after, each.
    let mut args = LAUNCH_ARGS.to_vec();
    args.push("--python-objects");
    let run = run_launch_env(
        &args,
        &[python.to_str().unwrap(), script],
        &[("PYTHONMALLOC", "pymalloc_debug")],
    );
    run.assert_exit(0);
    let r = &run.report;
    assert!(
        run.stderr.contains("does not apply under the debug hooks"),
        "{}",
        run.stderr
    );
    let unseen: Vec<&str> = r.0["untraced_entry_points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(unseen, ["PyMem_Malloc", "PyObject_Malloc"], "debug hooks");
    assert_eq!(
        blocks_of(r, "small_bytes", OBJ_SMALL + 24),
        0,
        "debug hooks"
    );
    let large = function_sites(r, "large_bytes");
    let (blocks, bytes) = large.iter().fold((0, 0), |(b, n), s| {
        (b + Report::blocks(s), n + Report::bytes(s))
    });
    assert_eq!(
        (blocks, bytes),
        (OBJ_N, OBJ_N * (OBJ_LARGE + 48)),
        "debug hooks: {:?}",
        function_tally(r)
    );
    assert_eq!(r.total("dropped_events"), 0, "debug hooks: {}", r.summary());
}

/// Debian's `libpython3.11.so.1.0` (what mod_wsgi, uwsgi and other
/// embedders link) is stripped: `--python-objects` finds pymalloc's
/// functions from their allocator table (`attach/pymalloc.rs`), exact per
/// line against `PYTHONMALLOC=malloc`, launched and attached to. Debian's
/// static LTO+PGO `/usr/bin/python3.11` copies pymalloc into its callers:
/// not traced, and stderr and the report say so.
#[test]
fn python_objects_in_stripped_and_lto_builds() {
    require_root();
    require_memtrace();
    let include = Path::new("/usr/include/python3.11/Python.h");
    if !include.is_file() || !Path::new("/usr/lib/x86_64-linux-gnu/libpython3.11.so").exists() {
        eprintln!("note: Debian's libpython3.11-dev not installed: skipped");
        return;
    }
    let flags = ["-I/usr/include/python3.11", "-lpython3.11"];
    let bin = build_fixture_with("py_embed", Variant::FramePointers, Some("py311deb"), &flags);
    let dir = fixtures_dir();
    let dir = dir.to_str().unwrap();
    let launch = [bin.to_str().unwrap(), dir, "launch", "py_objects"];
    let under_malloc = run_launch_env(LAUNCH_ARGS, &launch, &[("PYTHONMALLOC", "malloc")]);
    under_malloc.assert_exit(0);
    let expected = object_tally(&under_malloc.report);
    assert!(expected[1].1 >= OBJ_N * OBJ_K * 2, "{expected:?}");

    let mut args = LAUNCH_ARGS.to_vec();
    args.push("--python-objects");
    let run = run_launch_env(&args, &launch, &[]);
    run.assert_exit(0);
    assert!(
        run.stderr.contains("(pymalloc) are traced"),
        "{}",
        run.stderr
    );
    assert_objects_complete(&run.report, "Debian libpython3.11");
    assert_eq!(object_tally(&run.report), expected, "Debian libpython3.11");

    let mut target = TestProcess::spawn_env(&bin, &[dir, "attach", "py_objects"], &[]);
    target.wait_ready();
    let mut session = AttachSession::spawn(target.pid(), &["--python-objects"], &[]);
    session.memtrace.wait_attached();
    target.go();
    target.wait_done();
    let run = session.stop(libc::SIGINT);
    target.finish_unharmed();
    run.assert_exit(0);
    assert_objects_complete(&run.report, "Debian libpython3.11, attached");
    assert_eq!(object_tally(&run.report), expected, "attached");

    let debian = Path::new("/usr/bin/python3.11");
    if !debian.is_file() {
        eprintln!("note: /usr/bin/python3.11 not installed: skipped");
        return;
    }
    let script = objects_fixture();
    let run = run_launch_env(
        &args,
        &[debian.to_str().unwrap(), script.to_str().unwrap()],
        &[],
    );
    run.assert_exit(0);
    assert!(
        run.stderr
            .contains("is an LTO+PGO build that copies pymalloc's code"),
        "{}",
        run.stderr
    );
    let unseen: Vec<&str> = run.report.0["untraced_entry_points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(unseen, ["PyMem_Malloc", "PyObject_Malloc"], "LTO+PGO");
}
