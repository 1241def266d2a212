//! Python targets: leaks named by Python function, file and line, on each
//! CPython installed (pyenv's shared-libpython builds and Debian's static,
//! stripped, LTO `/usr/bin/python3.11`), launched and attached to.
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
    for v in ["3.11.7", "3.12.1", "3.13.0"] {
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
    assert!(!found.is_empty(), "no CPython 3.11-3.13 installed");
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

/// One leak: exactly N blocks of `size` at the line, in sites whose next
/// Python frame is `caller`.
fn assert_leak(r: &Report, what: &str, (function, line): (&str, u32), size: u64, caller: &str) {
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
            Some(caller),
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
fn python_before_3_11_is_named_and_traced_natively() {
    require_root();
    require_memtrace();
    let Some(python) = pyenv("3.10.13") else {
        eprintln!("note: pyenv CPython 3.10.13 not installed: skipped");
        return;
    };
    let script = fixture();
    let run = run_launch_env(
        LAUNCH_ARGS,
        &[python.to_str().unwrap(), script.to_str().unwrap()],
        &[("PYTHONMALLOC", "malloc")],
    );
    run.assert_exit(0);
    assert!(run.stderr.contains("CPython before 3.11"), "{}", run.stderr);
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
