//! Targets whose ELF files name hostile debug files: a FIFO (whose opening
//! would block for good), `/etc/shadow`, a symbolic link next to the program.
//! memtrace must finish as asked (`--duration`), write its report, never open
//! what the target named outside the debug directories, and count each refusal
//! in `drops.debug_files_refused`.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use memtrace_tests::*;

/// How long a `-d 3s` run may take once attached, the report included: far
/// less than forever, and far more than it needs (about 3.5 s). Attaching
/// itself (loading the BPF programs) is not counted: it can take tens of
/// seconds on a loaded machine running tests in parallel.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// A directory anyone can enter (the target runs as nobody), removed on drop.
struct OpenDir(PathBuf);

impl OpenDir {
    fn new() -> OpenDir {
        let p = unique_path("dir");
        let name = p.file_name().unwrap().to_owned();
        let dir = std::env::temp_dir().join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        OpenDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o666) };
    assert_eq!(rc, 0, "mkfifo {}", p.display());
}

fn run_tool(prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The reproduction: `printf 'PATH\0%020d' 0 > alt.bin; objcopy
/// --add-section .gnu_debugaltlink=alt.bin prog prog_alt`, here on the leaks
/// fixture (which has DWARF of its own).
fn with_altlink(dir: &Path, named: &Path) -> PathBuf {
    let prog = build_fixture("leaks", Variant::FramePointers);
    let mut alt = named.as_os_str().as_bytes().to_vec();
    alt.push(0);
    alt.extend_from_slice(format!("{:020}", 0).as_bytes());
    let alt_bin = dir.join("alt.bin");
    fs::write(&alt_bin, alt).unwrap();
    let out = dir.join("prog_alt");
    run_tool(
        "objcopy",
        &[
            "--add-section",
            &format!(".gnu_debugaltlink={}", alt_bin.display()),
            prog.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).unwrap();
    out
}

/// `bin attach`, run as nobody (as in the issue).
fn spawn_as_nobody(bin: &Path) -> TestProcess {
    TestProcess::spawn_ready(
        Path::new("setpriv"),
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin.to_str().unwrap(),
            "attach",
        ],
    )
}

/// `memtrace -d 3s -f json -o OUT --pid PID` while the target does its work;
/// fails unless it ends by itself within [`RUN_LIMIT`] with a report.
fn trace_for_3s(target: &mut TestProcess) -> (Value, String, Duration) {
    let out = unique_path("json");
    let mut c = memtrace_command();
    c.args(["-d", "3s", "-f", "json", "-o"])
        .arg(&out)
        .args(["--pid", &target.pid().to_string()]);
    let mut m = Memtrace::spawn(c);
    m.wait_attached();
    let t = Instant::now();
    target.go();
    target.wait_done();
    let status = m.wait(RUN_LIMIT.saturating_sub(t.elapsed()));
    let took = t.elapsed();
    eprintln!("memtrace ended {took:?} after attaching");
    let stderr = m.stderr();
    assert_no_panic(&stderr);
    assert!(
        status.success(),
        "memtrace {}; stderr:\n{stderr}",
        describe_status(&status)
    );
    let text = fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("no report at {}: {e}; stderr:\n{stderr}", out.display()));
    let _ = fs::remove_file(&out);
    let report: Value = serde_json::from_str(&text).expect("the report is JSON");
    (report, stderr, took)
}

fn refused(report: &Value, reason: &str) -> u64 {
    report["drops"]["debug_files_refused"][reason]
        .as_u64()
        .unwrap_or(0)
}

/// The report still names the program's own functions (its DWARF is its own).
fn assert_names_leaks(report: &Value, stderr: &str) {
    let r = Report(report.clone());
    assert!(
        r.sites()
            .iter()
            .any(|s| Report::frames(s).iter().any(|f| f.function() == "lvl3")),
        "no site names lvl3\n{}\nstderr:\n{stderr}",
        r.summary()
    );
}

#[test]
fn altlink_naming_a_fifo_neither_hangs_nor_is_opened() {
    require_root();
    let dir = OpenDir::new();
    let fifo = dir.path().join("F");
    mkfifo(&fifo);
    let bin = with_altlink(dir.path(), &fifo);
    let mut target = spawn_as_nobody(&bin);
    let (report, stderr, took) = trace_for_3s(&mut target);
    assert!(took < RUN_LIMIT, "took {took:?}");
    assert_eq!(report["end_reason"], "duration", "stderr:\n{stderr}");
    assert_eq!(
        refused(&report, "altlink_outside_debug_directories"),
        1,
        "{}\nstderr:\n{stderr}",
        report["drops"]
    );
    assert!(stderr.contains("refused 1 debug file"), "stderr:\n{stderr}");
    assert_names_leaks(&report, &stderr);
    assert!(target.is_running(), "the target died");
    target.finish_unharmed();
}

/// Watches `path` for opens (inotify IN_OPEN) while it lives.
struct OpenWatch {
    fd: libc::c_int,
}

impl OpenWatch {
    fn new(path: &Path) -> OpenWatch {
        // SAFETY: plain syscalls; the path is NUL-terminated.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            assert!(fd >= 0, "inotify_init1");
            let c = CString::new(path.as_os_str().as_bytes()).unwrap();
            let wd = libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS);
            assert!(wd >= 0, "inotify_add_watch {}", path.display());
            OpenWatch { fd }
        }
    }

    /// Whether anyone opened or read the file since the watch began.
    fn touched(&self) -> bool {
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a buffer of the size given.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        n > 0
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: closing the descriptor this owns.
        unsafe { libc::close(self.fd) };
    }
}

/// The same with `/etc/shadow`: root could read it, so the old memtrace did
/// (and `/dev/zero`, whose opening reaches a driver). Neither is opened now;
/// inotify sees every open of the file (another process opening /etc/shadow in
/// those seconds would fail this test, never pass it wrongly).
#[test]
fn altlink_naming_etc_shadow_or_a_device_is_not_opened() {
    require_root();
    for named in ["/etc/shadow", "/dev/zero"] {
        let dir = OpenDir::new();
        let bin = with_altlink(dir.path(), Path::new(named));
        let mut target = spawn_as_nobody(&bin);
        // Only the file: a device like /dev/zero is opened by others all the time.
        let watch = (named == "/etc/shadow").then(|| OpenWatch::new(Path::new(named)));
        let (report, stderr, _) = trace_for_3s(&mut target);
        assert!(
            !watch.is_some_and(|w| w.touched()),
            "{named} was opened during the run; stderr:\n{stderr}"
        );
        assert_eq!(
            refused(&report, "altlink_outside_debug_directories"),
            1,
            "{named}: {}\nstderr:\n{stderr}",
            report["drops"]
        );
        assert_eq!(
            refused(&report, "not_a_regular_file"),
            0,
            "{named}: not even looked at"
        );
        assert_names_leaks(&report, &stderr);
    }
}

/// A stripped program whose `.gnu_debuglink` names `prog.debug`, a symbolic link
/// next to it to a FIFO (the second form): refused, not followed.
#[test]
fn debuglink_symlinked_to_a_fifo_neither_hangs_nor_is_followed() {
    require_root();
    let dir = OpenDir::new();
    let d = dir.path();
    let prog = build_fixture("leaks", Variant::FramePointers);
    let bin = d.join("prog");
    let debug = d.join("prog.debug");
    run_tool(
        "objcopy",
        &[
            "--only-keep-debug",
            prog.to_str().unwrap(),
            debug.to_str().unwrap(),
        ],
    );
    run_tool(
        "objcopy",
        &[
            "--strip-debug",
            &format!("--add-gnu-debuglink={}", debug.display()),
            prog.to_str().unwrap(),
            bin.to_str().unwrap(),
        ],
    );
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    fs::remove_file(&debug).unwrap();
    let fifo = d.join("F");
    mkfifo(&fifo);
    std::os::unix::fs::symlink(&fifo, &debug).unwrap();
    let mut target = spawn_as_nobody(&bin);
    let (report, stderr, took) = trace_for_3s(&mut target);
    assert!(took < RUN_LIMIT, "took {took:?}");
    assert_eq!(
        refused(&report, "symlink"),
        1,
        "{}\nstderr:\n{stderr}",
        report["drops"]
    );
    // Named from the symbol table: functions, no lines.
    let r = Report(report.clone());
    assert!(
        r.sites()
            .iter()
            .any(|s| Report::frames(s).iter().any(|f| f.function() == "lvl3")),
        "{}",
        r.summary()
    );
}

fn symbolize(exe: &Path, addr: &str) -> Output {
    let mut c = memtrace_command();
    c.args(["symbolize", "-e"]).arg(exe).arg(addr);
    let t = Instant::now();
    let out = run_memtrace(c);
    assert!(
        t.elapsed() < RUN_LIMIT,
        "memtrace symbolize took {:?}",
        t.elapsed()
    );
    out
}

/// `memtrace symbolize` on a file whose altlink names a FIFO finishes and says
/// what it refused; `-e FIFO` is a clear error at once.
#[test]
fn symbolize_never_opens_a_fifo() {
    require_root();
    let dir = OpenDir::new();
    let fifo = dir.path().join("F");
    mkfifo(&fifo);
    let bin = with_altlink(dir.path(), &fifo);
    let out = symbolize(&bin, "0x1000");
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
    assert!(out.stdout.starts_with("0x"), "stdout:\n{}", out.stdout);
    assert!(
        out.stderr
            .contains("refused 1 debug file the file named (altlink_outside_debug_directories: 1)"),
        "stderr:\n{}",
        out.stderr
    );

    let out = symbolize(&fifo, "0x1000");
    assert_error(&out, 1, &["not a regular file"]);
    assert!(out.stderr.contains("FIFO"), "stderr:\n{}", out.stderr);
    let out = symbolize(Path::new("/dev/zero"), "0x1000");
    assert_error(&out, 1, &["not a regular file"]);
}
