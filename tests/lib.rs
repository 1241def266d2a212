//! Harness for memtrace's integration tests: real C/C++ fixtures, traced by the
//! real `memtrace` binary with its real BPF programs. These tests need root and
//! never skip themselves: run as anything else they fail and say why.
//!
//! Pieces:
//! - [`memtrace_bin`], [`require_root`]: what is tested, and the precondition.
//! - [`build_fixture`]: compiles `tests/fixtures/<name>.c|.cpp` once per
//!   [`Variant`] into `target/fixtures/<variant>/<name>` (cached, safe to call
//!   from parallel tests), [`source_line`]: the line of a `/* @marker */`.
//! - [`TestProcess`]: a fixture process speaking the protocol of
//!   `tests/fixtures/fixture.h` (ready / go / done / bye); killed and reaped on drop.
//! - [`Memtrace`], [`run_launch`], [`attach`], [`run_attach`]: memtrace runs
//!   with a JSON report in a fresh file, parsed into a [`Run`].
//! - [`Report`]: queries over a `memtrace-report/1` document whose failure
//!   messages print the report's sites.
//!
//! Nothing here asserts on timing: every timeout only guards against a hang.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long memtrace may take to print `memtrace: attached`.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fixture may take for its traced work (a million traced calls
/// take ~10 s here; this is only a hang guard).
pub const WORK_TIMEOUT: Duration = Duration::from_secs(300);
/// How long memtrace may take to write its report and exit once told to stop.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

// ---- paths ------------------------------------------------------------------

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The binary under test: `$MEMTRACE_BIN`, or `<workspace>/target/release/memtrace`.
pub fn memtrace_bin() -> PathBuf {
    match std::env::var_os("MEMTRACE_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/release/memtrace"),
    }
}

/// [`memtrace_bin`], checked to exist.
pub fn require_memtrace() -> PathBuf {
    let bin = memtrace_bin();
    assert!(
        bin.is_file(),
        "memtrace binary not found at {} — build it with `cargo xtask build` \
         (or run `cargo xtask test`), or point MEMTRACE_BIN at it",
        bin.display()
    );
    bin
}

/// Panics unless running as root: these tests load BPF programs and must not
/// silently pass without doing so.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "memtrace's integration tests load BPF programs into the kernel and must run as \
         root (euid is {euid}); run them with sudo or as root (`cargo xtask test` in CI)"
    );
}

/// Where tests keep their reports and scratch files.
pub fn scratch_dir() -> PathBuf {
    let dir = workspace_root().join("target/memtrace-tests");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A fresh path in [`scratch_dir`], named after the current test.
pub fn unique_path(ext: &str) -> PathBuf {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let test: String = thread::current()
        .name()
        .unwrap_or("test")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    scratch_dir().join(format!("{test}-{}-{n}.{ext}", std::process::id()))
}

// ---- fixtures -----------------------------------------------------------------

/// How a fixture is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// `-O0 -g -fno-omit-frame-pointer` (PIE, Debian's default).
    FramePointers,
    /// `-O2 -g -fno-omit-frame-pointer -fno-inline-functions-called-once`.
    FramePointersO2,
    /// FramePointers, not position independent.
    NoPie,
    /// FramePointers, statically linked: the allocator is in the executable.
    Static,
    /// `-O2 -g -fomit-frame-pointer`: for the DWARF unwinder (a later issue).
    NoFramePointers,
}

impl Variant {
    pub fn dir_name(self) -> &'static str {
        match self {
            Variant::FramePointers => "fp",
            Variant::FramePointersO2 => "fp-o2",
            Variant::NoPie => "nopie",
            Variant::Static => "static",
            Variant::NoFramePointers => "nofp",
        }
    }

    pub fn cflags(self) -> &'static [&'static str] {
        const FP: &[&str] = &["-O0", "-g", "-fno-omit-frame-pointer"];
        match self {
            Variant::FramePointers => FP,
            Variant::FramePointersO2 => &[
                "-O2",
                "-g",
                "-fno-omit-frame-pointer",
                "-fno-inline-functions-called-once",
            ],
            Variant::NoPie => &[
                "-O0",
                "-g",
                "-fno-omit-frame-pointer",
                "-no-pie",
                "-fno-pie",
            ],
            Variant::Static => &["-O0", "-g", "-fno-omit-frame-pointer", "-static"],
            Variant::NoFramePointers => &["-O2", "-g", "-fomit-frame-pointer"],
        }
    }
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `tests/fixtures/<name>.c`, or `.cpp`, or `.rs`.
pub fn fixture_source(name: &str) -> PathBuf {
    let dir = fixtures_dir();
    for ext in ["c", "cpp", "rs"] {
        let p = dir.join(format!("{name}.{ext}"));
        if p.is_file() {
            return p;
        }
    }
    panic!("no fixture {name}.c, .cpp or .rs in {}", dir.display());
}

/// Flags a fixture asks for itself, in a `@cflags: ... */` comment (e.g. `-pthread`).
fn own_cflags(source: &str) -> Vec<String> {
    let Some(start) = source.find("@cflags:") else {
        return Vec::new();
    };
    let rest = &source[start + "@cflags:".len()..];
    let end = rest
        .find("*/")
        .or_else(|| rest.find('\n'))
        .unwrap_or(rest.len());
    rest[..end].split_whitespace().map(str::to_owned).collect()
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Compiles fixture `name` in `variant` into `<workspace>/target/fixtures/<variant>/<name>`
/// and returns its path. Rebuilt only when the source (or a header beside it) is
/// newer than the binary or the command line changed; compiled to a temporary
/// name and renamed, so parallel tests (and test binaries) never see half a file.
pub fn build_fixture(name: &str, variant: Variant) -> PathBuf {
    build_fixture_with(name, variant, None, &[])
}

/// [`build_fixture`] with `extra` compiler arguments (`-ljemalloc`,
/// `-DLEAKS_NO_PVALLOC`), into `target/fixtures/<variant>-<tag>/<name>`
/// when `tag` is given.
pub fn build_fixture_with(
    name: &str,
    variant: Variant,
    tag: Option<&str>,
    extra: &[&str],
) -> PathBuf {
    let src = fixture_source(name);
    let text =
        fs::read_to_string(&src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    let cpp = src.extension() == Some(OsStr::new("cpp"));
    let dir = match tag {
        Some(tag) => format!("{}-{tag}", variant.dir_name()),
        None => variant.dir_name().to_string(),
    };
    let out_dir = workspace_root().join("target/fixtures").join(dir);
    fs::create_dir_all(&out_dir).unwrap_or_else(|e| panic!("creating {}: {e}", out_dir.display()));
    let out = out_dir.join(name);
    let stamp = out_dir.join(format!("{name}.cmd"));

    let compiler = if cpp { "g++" } else { "gcc" };
    let mut args: Vec<String> = variant.cflags().iter().map(|s| s.to_string()).collect();
    args.extend(["-Wall", "-Wno-deprecated-declarations"].map(String::from));
    args.push(format!("-I{}", fixtures_dir().display()));
    args.extend(own_cflags(&text));
    args.extend(extra.iter().map(|a| a.to_string()));
    let cmdline = format!("{compiler} {} {}", args.join(" "), src.display());

    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let newest_input = fs::read_dir(fixtures_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p == &src || p.extension() == Some(OsStr::new("h")))
        .filter_map(|p| mtime(&p))
        .max();
    let fresh = match (mtime(&out), newest_input) {
        (Some(o), Some(i)) => {
            o >= i && fs::read_to_string(&stamp).ok().as_deref() == Some(&cmdline)
        }
        _ => false,
    };
    if fresh {
        return out;
    }

    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let tmp = out_dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    // The source before the libraries (`-l`) it links with.
    let (libs, flags): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| a.starts_with("-l"));
    let output = Command::new(compiler)
        .args(&flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .args(&libs)
        .output()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    if !output.status.success() {
        let _ = fs::remove_file(&tmp);
        panic!(
            "compiling fixture {name} ({variant:?}) failed: {cmdline}\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("renaming {}: {e}", tmp.display()));
    let tmp_stamp = out_dir.join(format!(".{name}.cmd-{}-{n}", std::process::id()));
    fs::write(&tmp_stamp, &cmdline).expect("writing build stamp");
    fs::rename(&tmp_stamp, &stamp).expect("renaming build stamp");
    out
}

/// The line (1-based) of the unique `/* @marker */` comment in fixture `fixture`
/// (marker given with or without its `@`). Markers sit on the line of the call
/// they name, so no test hard-codes a line number.
pub fn source_line(fixture: &str, marker: &str) -> u32 {
    let marker = marker.trim_start_matches('@');
    let needle = format!("/* @{marker} */");
    let src = fixture_source(fixture);
    let text =
        fs::read_to_string(&src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    let hits: Vec<u32> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(&needle))
        .map(|(i, _)| i as u32 + 1)
        .collect();
    match hits.as_slice() {
        [line] => *line,
        [] => panic!("marker {needle} not found in {}", src.display()),
        _ => panic!(
            "marker {needle} is not unique in {} (lines {hits:?})",
            src.display()
        ),
    }
}

// ---- processes ------------------------------------------------------------------

/// Waits for `child` for at most `timeout`; `None` if it still runs.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill takes plain integers; a bad pid or signal is an error return.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert!(
        rc == 0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// How a process ended, readably: "exit 7" or "signal 9".
pub fn describe_status(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{st:?}"),
    }
}

/// What a fixture printed in its `done k=v ...` line (see fixture.h).
#[derive(Clone, Debug, Default)]
pub struct Tally(pub HashMap<String, u64>);

impl Tally {
    pub fn parse(line: &str) -> Tally {
        let mut m = HashMap::new();
        for kv in line.split_whitespace().skip(1) {
            if let Some((k, v)) = kv.split_once('=')
                && let Ok(v) = v.parse()
            {
                m.insert(k.to_string(), v);
            }
        }
        Tally(m)
    }

    pub fn get(&self, key: &str) -> u64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("fixture's done line has no {key}: {:?}", self.0))
    }
}

/// A fixture process: stdin and stdout piped for the protocol of fixture.h.
/// Dropping it kills (SIGKILL) and reaps it.
pub struct TestProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    what: String,
}

impl TestProcess {
    pub fn spawn(path: &Path, args: &[&str]) -> TestProcess {
        TestProcess::spawn_env(path, args, &[])
    }

    /// [`TestProcess::spawn`] with `env` set (`LD_PRELOAD`).
    pub fn spawn_env(path: &Path, args: &[&str], env: &[(&str, &str)]) -> TestProcess {
        let mut child = Command::new(path)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", path.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        TestProcess {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
            what: format!("{} {}", path.display(), args.join(" ")),
        }
    }

    /// Spawns a fixture in attach mode and waits for its "ready".
    pub fn spawn_ready(path: &Path, args: &[&str]) -> TestProcess {
        let mut p = TestProcess::spawn(path, args);
        p.wait_ready();
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line starting with `prefix` (earlier lines are skipped).
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "fixture `{}` printed no `{prefix}` line within {timeout:?}; it printed {:?}",
                    self.what, self.seen
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let st = wait_timeout(&mut self.child, Duration::from_secs(5));
                    panic!(
                        "fixture `{}` closed its stdout before printing `{prefix}` ({}); it printed {:?}",
                        self.what,
                        st.map(|s| describe_status(&s))
                            .unwrap_or_else(|| "still running".into()),
                        self.seen
                    )
                }
            }
        }
    }

    pub fn wait_ready(&mut self) {
        self.wait_line("ready", WORK_TIMEOUT);
    }

    /// Sends one byte: "go" before the work, "finish" after it.
    pub fn poke(&mut self) {
        let stdin = self.stdin.as_mut().expect("fixture's stdin is open");
        stdin
            .write_all(b"g")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to fixture `{}`: {e}", self.what));
    }

    pub fn go(&mut self) {
        self.poke();
    }

    pub fn wait_done(&mut self) -> Tally {
        Tally::parse(&self.wait_line("done", WORK_TIMEOUT))
    }

    /// After the work: asks the fixture to use its allocator a little more and
    /// exit; asserts it says "bye" and exits 0 (so it ran on unharmed).
    pub fn finish_unharmed(&mut self) {
        self.poke();
        self.wait_line("bye", WORK_TIMEOUT);
        let st = self.wait_exit(WORK_TIMEOUT);
        assert!(
            st.success(),
            "fixture `{}` did not exit cleanly after memtrace was gone: {}",
            self.what,
            describe_status(&st)
        );
    }

    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match wait_timeout(&mut self.child, timeout) {
            Some(st) => st,
            None => panic!("fixture `{}` did not exit within {timeout:?}", self.what),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// The one child of process `pid` (a wrapper's: `unshare --fork`, `chroot`
/// does not fork), as the host numbers it.
pub fn only_child(pid: u32) -> u32 {
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_else(|e| panic!("the children of {pid}: {e}"));
    let kids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(kids.len(), 1, "children of {pid}: {kids:?}");
    kids[0]
}

/// A command for memtrace, with the environment that would change its output removed.
pub fn memtrace_command() -> Command {
    let mut cmd = Command::new(require_memtrace());
    cmd.env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("RUST_LOG");
    cmd
}

fn collect_into(
    mut r: impl Read + Send + 'static,
    buf: Arc<Mutex<String>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    })
}

/// A running memtrace; stdout and stderr are collected. Dropping it kills and reaps it.
pub struct Memtrace {
    child: Child,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
    pub args: Vec<String>,
}

impl Memtrace {
    pub fn spawn(mut cmd: Command) -> Memtrace {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning memtrace {args:?}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect_into(child.stderr.take().unwrap(), stderr.clone()),
            collect_into(child.stdout.take().unwrap(), stdout.clone()),
        ];
        Memtrace {
            child,
            stderr,
            stdout,
            readers,
            args,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn is_attached(&self) -> bool {
        self.said("memtrace: attached")
    }

    /// Whether some line of memtrace's stderr so far starts with `prefix`.
    pub fn said(&self, prefix: &str) -> bool {
        self.stderr().lines().any(|l| l.starts_with(prefix))
    }

    /// Waits for the `memtrace: attached` line; fails (showing stderr) if memtrace
    /// exits first or takes longer than [`ATTACH_TIMEOUT`].
    pub fn wait_attached(&mut self) {
        self.wait_said("memtrace: attached");
    }

    /// Waits for a stderr line starting with `prefix`; fails (showing stderr)
    /// if memtrace exits first or takes longer than [`ATTACH_TIMEOUT`].
    pub fn wait_said(&mut self, prefix: &str) {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            if self.said(prefix) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                self.join_readers();
                panic!(
                    "memtrace {:?} exited ({}) before printing `{prefix}`; stderr:\n{}",
                    self.args,
                    describe_status(&st),
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "memtrace {:?} printed no `{prefix}` within {ATTACH_TIMEOUT:?}; stderr:\n{}",
                    self.args,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: i32) {
        send_signal(self.pid(), sig);
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Waits for memtrace to exit by itself (and for its output to be read).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match wait_timeout(&mut self.child, timeout) {
            Some(st) => {
                self.join_readers();
                st
            }
            None => {
                kill_and_reap(&mut self.child);
                self.join_readers();
                panic!(
                    "memtrace {:?} did not exit within {timeout:?} (killed it); stderr:\n{}",
                    self.args,
                    self.stderr()
                )
            }
        }
    }
}

impl Drop for Memtrace {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// The output of a memtrace run that is not expected to produce a report.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs memtrace to completion (killing it after [`EXIT_TIMEOUT`]).
pub fn run_memtrace(cmd: Command) -> Output {
    let mut m = Memtrace::spawn(cmd);
    let status = m.wait(EXIT_TIMEOUT);
    Output {
        status,
        stdout: m.stdout(),
        stderr: m.stderr(),
    }
}

/// Fails if memtrace's stderr shows a panic or a raw backtrace.
pub fn assert_no_panic(stderr: &str) {
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(
            !stderr.contains(bad),
            "memtrace's stderr contains `{bad}`:\n{stderr}"
        );
    }
}

/// The `memtrace: error:` lines of stderr.
pub fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("memtrace: error:"))
        .collect()
}

/// Asserts a run failed the way the contract says: exit `code`, a message
/// starting `memtrace: error:` that mentions one of `any_of` (case-insensitive;
/// empty = anything), nothing attached, no panic.
pub fn assert_error(out: &Output, code: i32, any_of: &[&str]) {
    let ctx = || {
        format!(
            "status: {}\nstdout:\n{}\nstderr:\n{}",
            describe_status(&out.status),
            out.stdout,
            out.stderr
        )
    };
    assert_eq!(
        out.code(),
        Some(code),
        "expected exit status {code}\n{}",
        ctx()
    );
    let errors = error_lines(&out.stderr);
    assert!(
        !errors.is_empty(),
        "no line of stderr starts with `memtrace: error:`\n{}",
        ctx()
    );
    for l in out.stderr.lines() {
        let t = l.trim_start();
        assert!(
            !(t.starts_with("error:") || t.starts_with("Error:")),
            "an error line without the `memtrace: ` prefix: {l:?}\n{}",
            ctx()
        );
    }
    if !any_of.is_empty() {
        let text = errors.join("\n").to_lowercase();
        assert!(
            any_of.iter().any(|k| text.contains(&k.to_lowercase())),
            "the error message mentions none of {any_of:?}\n{}",
            ctx()
        );
    }
    assert!(
        !out.stderr
            .lines()
            .any(|l| l.starts_with("memtrace: attached")),
        "memtrace attached although it failed\n{}",
        ctx()
    );
    assert_no_panic(&out.stderr);
}

// ---- runs with a report -------------------------------------------------------------

/// A finished memtrace run with its parsed JSON report.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub report: Report,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    fn context(&self) -> String {
        format!(
            "memtrace {}; stderr:\n{}",
            describe_status(&self.status),
            self.stderr
        )
    }

    pub fn assert_exit(&self, code: i32) {
        assert_eq!(
            self.code(),
            Some(code),
            "memtrace's exit status; {}",
            self.context()
        );
    }

    /// The fixture's `done` line, when it went to memtrace's stdout (launch mode).
    pub fn fixture_tally(&self) -> Option<Tally> {
        self.stdout
            .lines()
            .find(|l| l.starts_with("done"))
            .map(Tally::parse)
    }
}

fn finish_run(mut m: Memtrace, out: &Path, timeout: Duration) -> Run {
    let status = m.wait(timeout);
    let stderr = m.stderr();
    let stdout = m.stdout();
    assert_no_panic(&stderr);
    let text = fs::read_to_string(out).unwrap_or_else(|e| {
        panic!(
            "memtrace {:?} ({}) wrote no report at {}: {e}; stderr:\n{stderr}",
            m.args,
            describe_status(&status),
            out.display()
        )
    });
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "memtrace's report {} is not JSON ({e}):\n{text}\nstderr:\n{stderr}",
            out.display()
        )
    });
    let _ = fs::remove_file(out);
    Run {
        status,
        stdout,
        stderr,
        report: Report(value),
    }
}

fn report_args(out: &Path) -> Vec<String> {
    vec![
        "-f".into(),
        "json".into(),
        "-o".into(),
        out.display().to_string(),
    ]
}

/// `memtrace ARGS -f json -o <tmp> -- CMD...`, to its end (the command's).
pub fn run_launch(args: &[&str], cmd: &[&str]) -> Run {
    run_launch_env(args, cmd, &[])
}

pub fn run_launch_env(args: &[&str], cmd: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = memtrace_command();
    for (k, v) in env {
        c.env(k, v);
    }
    run_launch_with(c, args, cmd)
}

/// [`run_launch`] with `memtrace`, a command for some memtrace binary (the
/// static one of `cargo xtask dist`).
pub fn run_launch_with(mut memtrace: Command, args: &[&str], cmd: &[&str]) -> Run {
    let out = unique_path("json");
    memtrace
        .args(args)
        .args(report_args(&out))
        .arg("--")
        .args(cmd);
    let m = Memtrace::spawn(memtrace);
    let run = finish_run(m, &out, WORK_TIMEOUT);
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("memtrace: attached")),
        "memtrace never printed `memtrace: attached`; {}",
        run.context()
    );
    run
}

/// memtrace attached to a live target, with its report going to a fresh file.
pub struct AttachSession {
    pub memtrace: Memtrace,
    pub out: PathBuf,
}

impl AttachSession {
    /// Spawns `memtrace ARGS -f json -o <tmp> --pid PID` without waiting.
    pub fn spawn(pid: u32, args: &[&str], env: &[(&str, &str)]) -> AttachSession {
        let mut c = memtrace_command();
        for (k, v) in env {
            c.env(k, v);
        }
        AttachSession::spawn_with(c, pid, args)
    }

    /// [`AttachSession::spawn`] with `memtrace`, a command for some memtrace
    /// binary (the static one of `cargo xtask dist`).
    pub fn spawn_with(mut memtrace: Command, pid: u32, args: &[&str]) -> AttachSession {
        let out = unique_path("json");
        memtrace
            .args(args)
            .args(report_args(&out))
            .arg("--pid")
            .arg(pid.to_string());
        AttachSession {
            memtrace: Memtrace::spawn(memtrace),
            out,
        }
    }

    /// Stops memtrace with `sig` (SIGINT, SIGTERM) and reads its report.
    pub fn stop(self, sig: i32) -> Run {
        self.memtrace.signal(sig);
        self.finish()
    }

    /// Waits for memtrace to end by itself (target exit, --duration).
    pub fn finish(self) -> Run {
        let AttachSession { memtrace, out } = self;
        finish_run(memtrace, &out, WORK_TIMEOUT)
    }
}

/// `memtrace ARGS --pid <target>`, waited for until attached.
pub fn attach(target: &TestProcess, args: &[&str]) -> AttachSession {
    let mut s = AttachSession::spawn(target.pid(), args, &[]);
    s.memtrace.wait_attached();
    s
}

/// An attach-mode run over a fixture: what memtrace reported, what the fixture
/// counted, and the fixture itself (still running, waiting for its last byte).
pub struct AttachRun {
    pub run: Run,
    pub tally: Tally,
    pub target: TestProcess,
}

/// The whole attach-mode dance: start the fixture (`fixture_args`, usually
/// `["attach"]`), wait for "ready", attach memtrace, release the fixture, wait
/// for "done", stop memtrace with SIGINT, parse the report.
pub fn run_attach(fixture: &Path, fixture_args: &[&str], memtrace_args: &[&str]) -> AttachRun {
    run_attach_env(fixture, fixture_args, memtrace_args, &[])
}

/// [`run_attach`] with the fixture started with `env` set (`LD_PRELOAD`).
pub fn run_attach_env(
    fixture: &Path,
    fixture_args: &[&str],
    memtrace_args: &[&str],
    env: &[(&str, &str)],
) -> AttachRun {
    let mut target = TestProcess::spawn_env(fixture, fixture_args, env);
    target.wait_ready();
    let session = attach(&target, memtrace_args);
    target.go();
    let tally = target.wait_done();
    let run = session.stop(libc::SIGINT);
    AttachRun { run, tally, target }
}

/// Two targets of `fixture` at once, each traced by a memtrace of its own,
/// both memtraces attached before either target starts its work: while one
/// target runs, the other instance's probes are on the library they share
/// (the kernel runs every consumer of a probed address, whichever process
/// hits it). `env` is the fixtures' environment, `memtrace_env` memtrace's.
/// Returns both runs, in the order started.
pub fn run_attach_pair(
    fixture: &Path,
    fixture_args: &[&str],
    env: &[(&str, &str)],
    memtrace_env: &[(&str, &str)],
) -> [AttachRun; 2] {
    let mut targets = [(); 2].map(|_| TestProcess::spawn_env(fixture, fixture_args, env));
    for t in &mut targets {
        t.wait_ready();
    }
    let sessions = [0, 1].map(|i| {
        let mut s = AttachSession::spawn(targets[i].pid(), &[], memtrace_env);
        s.memtrace.wait_attached();
        s
    });
    for t in &mut targets {
        t.go();
    }
    let [tally0, tally1] = [0, 1].map(|i| targets[i].wait_done());
    let [run0, run1] = sessions.map(|s| s.stop(libc::SIGINT));
    let [target0, target1] = targets;
    [
        AttachRun {
            run: run0,
            tally: tally0,
            target: target0,
        },
        AttachRun {
            run: run1,
            tally: tally1,
            target: target1,
        },
    ]
}

/// The report of a run over leaks.c (`leaks attach`) has the calls the
/// fixture counted itself and every one of its core sites.
pub fn assert_matches_tally(what: &str, r: &Report, tally: &Tally) {
    assert_eq!(
        (r.total("alloc_calls"), r.total("free_calls")),
        (tally.get("alloc_calls"), tally.get("free_calls")),
        "{what}: (alloc_calls, free_calls) against the fixture's tally {:?}\n{}",
        tally.0,
        r.summary()
    );
    for site in leaks::CORE {
        site.assert_in(r);
    }
}

// ---- the report -----------------------------------------------------------------------

/// One frame of a site's stack.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub function: Option<String>,
    pub line: Option<u32>,
    pub file: Option<String>,
    pub module: Option<String>,
    pub address: Option<String>,
    pub inlined: bool,
}

impl Frame {
    pub fn from_json(v: &Value) -> Frame {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Frame {
            function: s("function"),
            line: v.get("line").and_then(Value::as_u64).map(|l| l as u32),
            file: s("file"),
            module: s("module"),
            address: s("address"),
            inlined: v.get("inlined").and_then(Value::as_bool).unwrap_or(false),
        }
    }

    pub fn function(&self) -> &str {
        self.function.as_deref().unwrap_or("?")
    }

    pub fn is(&self, function: &str, line: u32) -> bool {
        self.function.as_deref() == Some(function) && self.line == Some(line)
    }
}

/// How a frame is matched in a stack prefix: a function, and the line if given.
#[derive(Clone, Copy, Debug)]
pub struct At<'a>(pub &'a str, pub Option<u32>);

impl At<'_> {
    pub fn matches(&self, f: &Frame) -> bool {
        f.function.as_deref() == Some(self.0) && self.1.is_none_or(|l| f.line == Some(l))
    }
}

/// A parsed `memtrace-report/1` document.
#[derive(Clone, Debug)]
pub struct Report(pub Value);

pub fn u64_field(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("field `{key}` missing or not an unsigned integer in {v}"))
}

impl Report {
    pub fn sites(&self) -> &[Value] {
        self.0
            .get("sites")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_else(|| panic!("report has no `sites` array:\n{}", self.0))
    }

    pub fn totals(&self) -> &Value {
        self.0
            .get("totals")
            .unwrap_or_else(|| panic!("report has no `totals`:\n{}", self.0))
    }

    /// `totals.<key>`, which must be there.
    pub fn total(&self, key: &str) -> u64 {
        u64_field(self.totals(), key)
    }

    pub fn target(&self) -> &Value {
        self.0
            .get("target")
            .unwrap_or_else(|| panic!("report has no `target`:\n{}", self.0))
    }

    pub fn frames(site: &Value) -> Vec<Frame> {
        site.get("frames")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(Frame::from_json).collect())
            .unwrap_or_default()
    }

    pub fn blocks(site: &Value) -> u64 {
        u64_field(site, "outstanding_blocks")
    }

    pub fn bytes(site: &Value) -> u64 {
        u64_field(site, "outstanding_bytes")
    }

    /// One line per site: "blocks/bytes  f0:line < f1:line < ...".
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if let Some(t) = self.0.get("totals") {
            let _ = writeln!(s, "totals: {t}");
        }
        let sites = self
            .0
            .get("sites")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let _ = writeln!(s, "{} sites:", sites.len());
        for site in &sites {
            let frames: Vec<String> = Self::frames(site)
                .iter()
                .take(10)
                .map(|f| {
                    format!(
                        "{}{}:{}",
                        if f.inlined { "[inl]" } else { "" },
                        f.function(),
                        f.line.map(|l| l.to_string()).unwrap_or_else(|| "?".into())
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "  {:>5} blocks {:>8} bytes  {}",
                site.get("outstanding_blocks").unwrap_or(&Value::Null),
                site.get("outstanding_bytes").unwrap_or(&Value::Null),
                frames.join(" < ")
            );
        }
        s
    }

    /// Sites whose stack starts with `prefix` (frame 0 first).
    pub fn sites_with_prefix(&self, prefix: &[At]) -> Vec<&Value> {
        self.sites()
            .iter()
            .filter(|site| {
                let frames = Self::frames(site);
                frames.len() >= prefix.len()
                    && prefix.iter().zip(&frames).all(|(p, f)| p.matches(f))
            })
            .collect()
    }

    /// Sites whose frame 0 is `function` at `line`.
    pub fn sites_at(&self, function: &str, line: u32) -> Vec<&Value> {
        self.sites_with_prefix(&[At(function, Some(line))])
    }

    /// The site whose frame 0 is `function` at `line`, which must be unique.
    pub fn site_at(&self, function: &str, line: u32) -> &Value {
        let found = self.sites_at(function, line);
        assert!(
            found.len() == 1,
            "expected exactly one site with frame 0 = {function}:{line}, found {}\n{}",
            found.len(),
            self.summary()
        );
        found[0]
    }

    pub fn find_site(&self, function: &str, line: u32) -> Option<&Value> {
        self.sites_at(function, line).into_iter().next()
    }

    /// Sites with `function` anywhere in their stack.
    pub fn sites_containing(&self, function: &str) -> Vec<&Value> {
        self.sites()
            .iter()
            .filter(|s| {
                Self::frames(s)
                    .iter()
                    .any(|f| f.function.as_deref() == Some(function))
            })
            .collect()
    }

    fn sum(sites: &[&Value]) -> (u64, u64) {
        sites.iter().fold((0, 0), |(b, n), s| {
            (b + Self::blocks(s), n + Self::bytes(s))
        })
    }

    /// (outstanding blocks, bytes) summed over the sites starting with `prefix`.
    /// (An optimised loop may call the allocator from several instructions of
    /// one line: several sites, one expectation.)
    pub fn outstanding_with_prefix(&self, prefix: &[At]) -> (u64, u64) {
        Self::sum(&self.sites_with_prefix(prefix))
    }

    /// (outstanding blocks, bytes) summed over the sites containing `function`.
    pub fn outstanding_containing(&self, function: &str) -> (u64, u64) {
        Self::sum(&self.sites_containing(function))
    }

    /// Asserts the sites starting with `prefix` hold exactly `blocks` blocks and `bytes` bytes.
    pub fn assert_outstanding(&self, prefix: &[At], blocks: u64, bytes: u64) {
        let got = self.outstanding_with_prefix(prefix);
        assert_eq!(
            got,
            (blocks, bytes),
            "outstanding (blocks, bytes) of the sites starting with {prefix:?}\n{}",
            self.summary()
        );
    }

    /// Asserts no site has a frame whose function satisfies `bad`.
    pub fn assert_no_frame(&self, what: &str, bad: impl Fn(&str) -> bool) {
        for site in self.sites() {
            for f in Self::frames(site) {
                if let Some(name) = &f.function {
                    assert!(
                        !bad(name),
                        "a site has a frame `{name}` ({what})\n{}",
                        self.summary()
                    );
                }
            }
        }
    }

    /// Asserts the sites are sorted by outstanding_bytes, largest first.
    pub fn assert_sorted(&self) {
        let bytes: Vec<u64> = self.sites().iter().map(Self::bytes).collect();
        assert!(
            bytes.windows(2).all(|w| w[0] >= w[1]),
            "sites are not sorted by outstanding_bytes (largest first): {bytes:?}\n{}",
            self.summary()
        );
    }
}

// ---- odds and ends ----------------------------------------------------------------------

/// A pid that no process has now (for "no such process").
pub fn unused_pid() -> u32 {
    let max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (100..max)
        .rev()
        .step_by(7)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("some pid is free")
}

/// A copy of the memtrace binary that an unprivileged user can execute (the
/// checkout may sit in a directory only root can enter).
pub fn world_executable_memtrace() -> PathBuf {
    let bin = require_memtrace();
    let reachable = bin.ancestors().skip(1).all(|d| {
        fs::metadata(d)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    }) && fs::metadata(&bin)
        .map(|m| m.permissions().mode() & 0o001 != 0)
        .unwrap_or(false);
    if reachable {
        return bin;
    }
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("memtrace-tests-{}-{n}", std::process::id()));
    fs::create_dir_all(&dir).expect("creating a temp dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    let copy = dir.join("memtrace");
    fs::copy(&bin, &copy).expect("copying memtrace");
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod memtrace copy");
    copy
}

/// The syscall a process's threads are blocked in (from /proc/PID/task/*/syscall).
pub fn blocked_syscalls(pid: u32) -> Vec<i64> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = fs::read_to_string(t.path().join("syscall"))
            && let Some(Ok(n)) = s.split_whitespace().next().map(str::parse::<i64>)
        {
            out.push(n);
        }
    }
    out
}

// ---- what the fixtures leak --------------------------------------------------------------

/// The sites of `tests/fixtures/leaks.c` (see its header comment).
pub mod leaks {
    use super::{At, Report, source_line};

    /// One expected site: frame 0 is `function` at the line of `marker`; frame 1,
    /// when given, is `caller` (at the line of its marker, if given).
    #[derive(Clone, Copy, Debug)]
    pub struct Site {
        pub function: &'static str,
        pub marker: &'static str,
        pub caller: Option<(&'static str, Option<&'static str>)>,
        pub blocks: u64,
        pub size: u64,
    }

    const fn site(function: &'static str, marker: &'static str, blocks: u64, size: u64) -> Site {
        Site {
            function,
            marker,
            caller: None,
            blocks,
            size,
        }
    }

    /// The sites every tracer that handles each allocator right must report.
    pub const CORE: &[Site] = &[
        Site {
            caller: Some(("lvl2", Some("call_lvl3"))),
            ..site("lvl3", "malloc_deep", 37, 64)
        },
        Site {
            caller: Some(("twig_x", Some("twig_x_call"))),
            ..site("shared_leaf", "shared_leaf", 10, 48)
        },
        Site {
            caller: Some(("twig_y", Some("twig_y_call"))),
            ..site("shared_leaf", "shared_leaf", 21, 48)
        },
        Site {
            caller: Some(("run_leaks", None)),
            ..site("leak_calloc", "calloc", 5, 1000)
        },
        site("leak_realloc_null", "realloc_null", 13, 72),
        site("leak_realloc_move", "realloc_move", 6, 4000),
        site("leak_realloc_chain", "chain_realloc", 4, 8192),
        site("leak_realloc_shrink", "realloc_shrink", 3, 1200),
        site("leak_reallocarray", "reallocarray_null", 11, 168),
        site("leak_reallocarray", "reallocarray_grow", 2, 1500),
        site("leak_aligned", "posix_memalign", 7, 320),
        site("leak_aligned", "posix_memalign_small", 3, 640),
        site("leak_aligned", "aligned_alloc", 8, 384),
        site("leak_aligned", "aligned_alloc_small", 5, 104),
        site("leak_aligned", "memalign", 9, 200),
        site("leak_aligned", "valloc", 3, 1234),
        site("leak_aligned", "pvalloc", 2, 555),
        site("failures", "kept_failed_realloc", 2, 77),
    ];

    /// malloc(91) then a reallocarray(p, 2^32, 2^32) that fails on overflow.
    pub const KEPT_FAILED_REALLOCARRAY: Site = site("failures", "kept_failed_reallocarray", 2, 91);
    /// malloc(0): blocks without bytes.
    pub const ZERO_SIZE: Site = site("leak_zero_size", "malloc_zero", 4, 0);
    /// malloc in an always_inline function: frame 0 is the inlined function.
    pub const INLINED: Site = Site {
        caller: Some(("with_inline", Some("call_inl"))),
        ..site("inl_alloc", "inl_malloc", 4, 88)
    };

    pub fn all() -> Vec<Site> {
        let mut v = CORE.to_vec();
        v.extend([KEPT_FAILED_REALLOCARRAY, ZERO_SIZE, INLINED]);
        v
    }

    /// Everything leaks.c leaves outstanding: (blocks, bytes).
    pub fn total() -> (u64, u64) {
        all()
            .iter()
            .fold((0, 0), |(b, n), s| (b + s.blocks, n + s.blocks * s.size))
    }

    /// Functions that allocate the leaks (frame 0 of a leak site, or the
    /// function an inlined frame 0 sits in).
    pub const LEAK_FUNCTIONS: &[&str] = &[
        "lvl3",
        "shared_leaf",
        "leak_calloc",
        "leak_realloc_null",
        "leak_realloc_move",
        "leak_realloc_chain",
        "leak_realloc_shrink",
        "leak_reallocarray",
        "leak_aligned",
        "failures",
        "leak_zero_size",
        "inl_alloc",
        "with_inline",
    ];

    /// The stack of the deepest leak, innermost first: (function, marker of its line).
    pub const DEEP_STACK: &[(&str, &str)] = &[
        ("lvl3", "malloc_deep"),
        ("lvl2", "call_lvl3"),
        ("lvl1", "call_lvl2"),
        ("run_leaks", "call_lvl1"),
        ("main", "call_run_leaks"),
    ];

    /// Lines that allocated blocks that are all gone (realloc'ed or freed).
    pub const GONE: &[(&str, &str)] = &[
        ("leak_realloc_move", "realloc_move_src"),
        ("leak_realloc_move", "realloc_move_fence"),
        ("leak_realloc_chain", "chain_src"),
        ("leak_realloc_shrink", "realloc_shrink_src"),
        ("realloc_zero", "realloc_zero_src"),
        ("realloc_zero", "realloc_zero"),
        ("leak_reallocarray", "reallocarray_grow_src"),
        ("failures", "failed_malloc"),
        ("failures", "failed_calloc"),
        ("failures", "failed_posix_memalign"),
        ("failures", "failed_realloc"),
        ("failures", "failed_reallocarray"),
    ];

    impl Site {
        pub fn line(&self) -> u32 {
            source_line("leaks", self.marker)
        }

        pub fn prefix(&self) -> Vec<At<'static>> {
            let mut p = vec![At(self.function, Some(self.line()))];
            if let Some((f, m)) = self.caller {
                p.push(At(f, m.map(|m| source_line("leaks", m))));
            }
            p
        }

        /// Asserts the report holds exactly this site's blocks and bytes.
        pub fn assert_in(&self, report: &Report) {
            let prefix = self.prefix();
            let got = report.outstanding_with_prefix(&prefix);
            assert_eq!(
                got,
                (self.blocks, self.blocks * self.size),
                "leaks.c site @{} ({} x {} B): outstanding (blocks, bytes) of the sites \
                 starting with {prefix:?}\n{}",
                self.marker,
                self.blocks,
                self.size,
                report.summary()
            );
        }
    }
}

// ---- the harness's own tests (no root, no memtrace needed) ---------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixture_builds_in_every_variant() {
        for name in ["leaks", "threads", "leaks_cpp", "exits_early"] {
            for v in [
                Variant::FramePointers,
                Variant::FramePointersO2,
                Variant::NoPie,
                Variant::Static,
                Variant::NoFramePointers,
            ] {
                let p = build_fixture(name, v);
                assert!(p.is_file(), "{}", p.display());
                // Cached: the second call does not rebuild.
                let t = mtime(&p);
                assert_eq!(build_fixture(name, v), p);
                assert_eq!(mtime(&p), t);
            }
        }
        assert!(build_fixture("noalloc", Variant::FramePointers).is_file());
    }

    #[test]
    fn markers_resolve() {
        for s in leaks::all() {
            assert!(s.line() > 0);
            if let Some((_, Some(m))) = s.caller {
                source_line("leaks", m);
            }
        }
        for (_, m) in leaks::DEEP_STACK.iter().chain(leaks::GONE) {
            source_line("leaks", m);
        }
        assert_eq!(leaks::total(), (161, 90060));
    }

    #[test]
    #[should_panic(expected = "not found")]
    fn missing_marker_panics() {
        source_line("leaks", "no_such_marker");
    }

    #[test]
    fn tally_parses() {
        let t = Tally::parse("done alloc_calls=3 alloc_bytes=40 free_calls=1 failed=0");
        assert_eq!(
            (
                t.get("alloc_calls"),
                t.get("alloc_bytes"),
                t.get("free_calls"),
                t.get("failed")
            ),
            (3, 40, 1, 0)
        );
    }

    #[test]
    fn fixture_protocol_untraced() {
        // The fixtures' own logic, without memtrace: counts as documented.
        let bin = build_fixture("leaks", Variant::FramePointers);
        let mut p = TestProcess::spawn_ready(&bin, &["attach"]);
        p.go();
        let t = p.wait_done();
        assert_eq!(t.get("alloc_calls") - t.get("free_calls"), 161, "{:?}", t.0);
        assert_eq!(t.get("failed"), 10);
        assert_eq!(t.get("realloc_moved"), 6);
        p.finish_unharmed();

        let bin = build_fixture("threads", Variant::FramePointers);
        let mut p = TestProcess::spawn_ready(&bin, &["before"]);
        p.go();
        let t = p.wait_done();
        assert_eq!(t.get("alloc_calls") - t.get("free_calls"), 240, "{:?}", t.0);
        assert!(t.get("alloc_calls") + t.get("free_calls") >= 1_000_000);
        drop(p);

        let bin = build_fixture("exits_early", Variant::FramePointers);
        let mut p = TestProcess::spawn_ready(&bin, &["attach", "3"]);
        p.go();
        p.wait_done();
        assert_eq!(p.wait_exit(WORK_TIMEOUT).code(), Some(3));
    }

    #[test]
    fn report_queries() {
        let r = Report(serde_json::json!({
            "totals": {"outstanding_blocks": 3, "outstanding_bytes": 30},
            "sites": [
                {"outstanding_blocks": 2, "outstanding_bytes": 20, "frames": [
                    {"function": "a", "line": 5, "inlined": false}, {"function": "main", "line": 9}]},
                {"outstanding_blocks": 1, "outstanding_bytes": 10, "frames": [
                    {"function": "a", "line": 5}, {"function": "b", "line": 7}, {"function": "main", "line": 10}]}
            ]
        }));
        assert_eq!(r.sites_at("a", 5).len(), 2);
        assert_eq!(
            r.outstanding_with_prefix(&[At("a", Some(5)), At("b", None)]),
            (1, 10)
        );
        assert_eq!(r.outstanding_containing("main"), (3, 30));
        r.assert_sorted();
        assert!(
            r.summary().contains("a:5 < b:7 < main:10"),
            "{}",
            r.summary()
        );
    }
}
