//! Hostile or unlucky targets. Their ELF files name hostile debug files: a
//! FIFO (whose opening would block for good), `/etc/shadow`, a symbolic link
//! next to the program, `../`; memtrace must finish as asked (`--duration`),
//! write its report, never open what the target named outside the debug
//! directories, and count each refusal in `drops.debug_files_refused`. Their
//! files block (FUSE) or memtrace's main thread does: the probes still go
//! within a second, and the report says what was cut short. And what held
//! before, kept so: SIGKILL, SIGSTOP, two instances, unlinked and replaced
//! programs, another mount namespace, corrupt and huge tables and sections.

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

/// The issue's reproduction: `printf 'PATH\0%020d' 0 > alt.bin; objcopy
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
/// next to it to a FIFO (the issue's second form): refused, not followed.
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

// ---- what held: keep it so ----------------------------------------------------
//
// Covered elsewhere: exact drop counts when maps are full (report.rs,
// `a_full_block_map_is_counted_never_silent`, `a_full_stack_map_keeps_the_blocks_
// without_their_stack`); corrupt `.eh_frame` and ELF/DWARF input (unit tests
// `corrupted_input_does_not_panic`, `corrupted_files_do_not_panic`, and the
// fuzz targets of `cargo xtask fuzz`); debug links that leave the debug
// directories (the tests above and `symbolize::debug_search`'s).

/// The BPF objects (programs, maps, links) a process holds, by kind and id,
/// from its descriptors' fdinfo.
fn bpf_objects(pid: u32) -> Vec<(&'static str, u32)> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        };
        for line in text.lines() {
            for kind in ["prog_id", "map_id", "link_id"] {
                if let Some(v) = line.strip_prefix(kind).and_then(|r| r.strip_prefix(':'))
                    && let Ok(id) = v.trim().parse()
                {
                    out.push((kind, id));
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether the kernel still has the BPF object (`BPF_*_GET_FD_BY_ID`).
fn bpf_object_exists(kind: &str, id: u32) -> bool {
    let cmd = match kind {
        "prog_id" => 13, // BPF_PROG_GET_FD_BY_ID
        "map_id" => 14,  // BPF_MAP_GET_FD_BY_ID
        _ => 30,         // BPF_LINK_GET_FD_BY_ID
    };
    let mut attr = [0u32; 32];
    attr[0] = id;
    // SAFETY: the bpf syscall with an attribute buffer of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: closing the descriptor just returned.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
}

/// The probes memtrace holds: its BPF links and perf events.
fn probe_fds(pid: u32) -> usize {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            fs::read_link(e.path()).is_ok_and(|t| {
                let t = t.to_string_lossy();
                t == "anon_inode:bpf_link" || t == "anon_inode:[perf_event]"
            })
        })
        .count()
}

fn leaks() -> PathBuf {
    build_fixture("leaks", Variant::FramePointers)
}

/// SIGKILL gives memtrace no chance to clean up: the kernel must, and the
/// target must run on unharmed.
#[test]
fn sigkill_of_memtrace_leaves_the_target_running_and_no_bpf_object() {
    require_root();
    let mut target = TestProcess::spawn_ready(&leaks(), &["attach"]);
    let mut session = attach(&target, &[]);
    let objects = bpf_objects(session.memtrace.pid());
    for kind in ["prog_id", "map_id", "link_id"] {
        assert!(
            objects.iter().any(|o| o.0 == kind),
            "memtrace holds no {kind}: {objects:?}"
        );
    }
    session.memtrace.signal(libc::SIGKILL);
    let status = session.memtrace.wait(RUN_LIMIT);
    assert_eq!(status.signal_number(), Some(libc::SIGKILL));
    // The kernel frees what the last descriptor held, some of it later (RCU).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left: Vec<_> = objects.clone();
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&(kind, id)| bpf_object_exists(kind, id));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(left.is_empty(), "still in the kernel: {left:?}");
    let _ = fs::remove_file(&session.out);
    // Unharmed: it allocates and frees with no probe in its way, and exits 0.
    target.go();
    target.wait_done();
    target.finish_unharmed();
}

trait SignalNumber {
    fn signal_number(&self) -> Option<i32>;
}

impl SignalNumber for std::process::ExitStatus {
    fn signal_number(&self) -> Option<i32> {
        std::os::unix::process::ExitStatusExt::signal(self)
    }
}

/// Two memtraces on one pid: each sees every call, neither disturbs the other.
#[test]
fn two_instances_on_one_pid_both_count_exactly() {
    require_root();
    let mut target = TestProcess::spawn_ready(&leaks(), &["attach"]);
    let first = attach(&target, &[]);
    let second = attach(&target, &[]);
    target.go();
    let tally = target.wait_done();
    for (name, session) in [("first", first), ("second", second)] {
        let run = session.stop(libc::SIGINT);
        run.assert_exit(0);
        assert_matches_tally(name, &run.report, &tally);
    }
    target.finish_unharmed();
}

/// Two memtraces, each on its own process, the two processes on one C
/// library. Each instance's probes are on the same addresses of that file,
/// so the kernel runs both instances' programs for a hit in either process;
/// a pid-bound uprobe session then arms a return probe in the other's
/// target (see docs/probes.md), whose trampoline replaces return addresses
/// there, where memtrace tells the allocator's own calls from the
/// program's, and, armed at a mark inside a function, a stack slot. Each
/// report is still exactly the report of the same run traced alone: every
/// call, every internal call, every site; with result sites, and with
/// `malloc` probed at its entry (as when sampling), where 303 of glibc's own
/// calls were once counted as the program's.
#[test]
fn two_instances_on_processes_sharing_glibc_count_exactly() {
    require_root();
    for (probes, env) in [
        ("result sites", &[][..]),
        ("entry probes", &[("MEMTRACE_PROBES", "entry")][..]),
    ] {
        let alone = {
            let mut target = TestProcess::spawn_ready(&leaks(), &["attach"]);
            let mut session = AttachSession::spawn(target.pid(), &[], env);
            session.memtrace.wait_attached();
            target.go();
            target.wait_done();
            let run = session.stop(libc::SIGINT);
            run.assert_exit(0);
            target.finish_unharmed();
            run
        };
        let internal = alone.report.total("allocator_internal_calls");
        for (
            i,
            AttachRun {
                run,
                tally,
                mut target,
            },
        ) in run_attach_pair(&leaks(), &["attach"], &[], env)
            .into_iter()
            .enumerate()
        {
            let what = format!("{probes}, instance {i}");
            run.assert_exit(0);
            let r = &run.report;
            assert_matches_tally(&what, r, &tally);
            assert_eq!(
                (
                    r.total("allocator_internal_calls"),
                    r.total("outstanding_blocks"),
                    r.total("outstanding_bytes"),
                    r.total("dropped_events"),
                    r.total("stack_errors"),
                ),
                (internal, leaks::total().0, leaks::total().1, 0, 0),
                "{what}: (allocator_internal_calls, outstanding blocks and bytes, dropped, \
                 stack errors), against a run alone\n{}",
                r.summary()
            );
            // Unharmed by the other instance's return probes.
            target.finish_unharmed();
        }
    }
}

/// memtrace stopped (SIGSTOP) while the target works: the BPF programs still
/// record every call, and the report, once it goes on, has them all.
#[test]
fn sigstop_and_sigcont_of_memtrace_lose_nothing() {
    require_root();
    let mut target = TestProcess::spawn_ready(&leaks(), &["attach"]);
    let session = attach(&target, &["-i", "200ms"]);
    session.memtrace.signal(libc::SIGSTOP);
    target.go();
    let tally = target.wait_done();
    std::thread::sleep(Duration::from_millis(500));
    session.memtrace.signal(libc::SIGCONT);
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    assert_matches_tally("stopped and continued", &run.report, &tally);
    assert_eq!(run.report.total("dropped_events"), 0);
    target.finish_unharmed();
}

/// The program's file unlinked, then another file put at its path, before
/// memtrace attaches: memtrace reads what is mapped, not what the path names.
#[test]
fn an_unlinked_and_replaced_program_is_still_named() {
    require_root();
    let dir = OpenDir::new();
    let bin = dir.path().join("leaks");
    fs::copy(leaks(), &bin).unwrap();
    let mut target = TestProcess::spawn_ready(&bin, &["attach"]);
    fs::remove_file(&bin).unwrap();
    fs::copy("/bin/true", &bin).unwrap();
    let session = attach(&target, &[]);
    target.go();
    target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    for site in leaks::CORE {
        site.assert_in(&run.report);
    }
    target.finish_unharmed();
}

/// A target in a mount namespace of its own, running a program that exists
/// only there (on a tmpfs mounted in it): memtrace reaches it through the
/// target's root.
#[test]
fn a_target_in_another_mount_namespace_is_named() {
    require_root();
    let dir = OpenDir::new();
    let staged = dir.path().join("staged");
    fs::copy(leaks(), &staged).unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let script = format!(
        "mount -t tmpfs none {m} && cp {s} {m}/leaks && exec {m}/leaks attach",
        m = mnt.display(),
        s = staged.display()
    );
    let mut target = TestProcess::spawn_ready(
        Path::new("unshare"),
        &["-m", "--propagation", "private", "sh", "-c", &script],
    );
    assert!(
        fs::read_dir(&mnt).unwrap().next().is_none(),
        "the tmpfs is not in our namespace"
    );
    let session = attach(&target, &[]);
    target.go();
    target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    for site in leaks::CORE {
        site.assert_in(&run.report);
    }
    target.finish_unharmed();
}

// ---- nothing blocks memtrace for good ------------------------------------------

/// memtrace whose main thread blocks for good at `stall` (as in a read of a
/// file that never answers), attached to the leaks fixture with `args`.
fn stalled_at(stall: &str, args: &[&str]) -> (TestProcess, AttachSession) {
    let target = TestProcess::spawn_ready(&leaks(), &["attach"]);
    let mut s = AttachSession::spawn(target.pid(), args, &[("MEMTRACE_DEBUG_STALL", stall)]);
    s.memtrace.wait_attached();
    (target, s)
}

/// Waits until `memtrace` holds no probe, at most `limit`; how long it took.
fn probes_gone_within(pid: u32, limit: Duration) -> Duration {
    let t = Instant::now();
    while probe_fds(pid) > 0 {
        assert!(
            t.elapsed() < limit,
            "memtrace still holds {} probes",
            probe_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// The main thread blocked while tracing: when --duration ends, the watchdog
/// removes the probes (within a second), says so, and when a second signal
/// goes unanswered, ends memtrace with status 1 and no report.
#[test]
fn a_main_thread_blocked_while_tracing_still_detaches() {
    require_root();
    let (mut target, mut s) = stalled_at("summary", &["-i", "500ms", "-d", "2s"]);
    let pid = s.memtrace.pid();
    assert!(probe_fds(pid) > 0, "no probes to watch");
    // Blocked at 0.5 s; --duration ends tracing at 2 s.
    std::thread::sleep(Duration::from_secs(2));
    probes_gone_within(pid, Duration::from_secs(5));
    let deadline = Instant::now() + RUN_LIMIT;
    while !s
        .memtrace
        .stderr()
        .contains("removed by memtrace's watchdog")
    {
        assert!(Instant::now() < deadline, "{}", s.memtrace.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The target runs at full speed again, untraced.
    target.go();
    target.wait_done();
    s.memtrace.signal(libc::SIGINT);
    let status = s.memtrace.wait(RUN_LIMIT);
    let stderr = s.memtrace.stderr();
    assert_no_panic(&stderr);
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("memtrace: error: memtrace was blocked making the live summary")
            && stderr.contains("no report written"),
        "stderr:\n{stderr}"
    );
    let _ = fs::remove_file(&s.out);
    target.finish_unharmed();
}

/// The main thread blocked symbolizing the report (the probes are out by
/// then): a second Ctrl-C it leaves unread makes the watchdog write the
/// report as built so far, with frames unnamed and `cut_short` saying so.
#[test]
fn a_main_thread_blocked_symbolizing_writes_the_report_it_has() {
    require_root();
    let (mut target, s) = stalled_at("symbolize", &[]);
    target.go();
    let tally = target.wait_done();
    s.memtrace.signal(libc::SIGINT);
    probes_gone_within(s.memtrace.pid(), Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    s.memtrace.signal(libc::SIGINT);
    let AttachSession { mut memtrace, out } = s;
    let status = memtrace.wait(RUN_LIMIT);
    let stderr = memtrace.stderr();
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    let text = fs::read_to_string(&out).unwrap_or_else(|e| panic!("no report: {e}\n{stderr}"));
    let _ = fs::remove_file(&out);
    let r = Report(serde_json::from_str(&text).expect("the report is JSON"));
    assert_eq!(r.total("alloc_calls"), tally.get("alloc_calls"));
    let cut = r.0["cut_short"].to_string();
    assert!(
        cut.contains("blocked symbolizing the report's stacks"),
        "{cut}"
    );
    // Frames have their address and module, not their names.
    let frames = Report::frames(&r.sites()[0]);
    assert!(!frames.is_empty() && frames.iter().all(|f| f.function.is_none()));
    assert!(
        r.0["drops"]["unresolved_frames"]["debug_info_not_loaded_in_time"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    target.finish_unharmed();
}

/// `umount -l` of a mount point when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A stallfs mount in a fresh directory serving a copy of `dlopen_lib` as
/// `libstall.so` to everyone but memtrace (`deaf`: not even answering the
/// kernel's interrupt). Dropped: the server killed (which aborts the
/// connection and frees whoever waits on it), then the mount detached.
struct StallFs {
    lib: PathBuf,
    _unmount: Unmount,
    _server: TestProcess,
    _dir: OpenDir,
}

impl StallFs {
    fn mount(deaf: bool) -> StallFs {
        let dir = OpenDir::new();
        let mnt = dir.path().join("mnt");
        let staged = dir.path().join("libstall.so");
        fs::copy(build_fixture("dlopen_lib", Variant::FramePointers), &staged).unwrap();
        StallFs::serve(dir, &mnt, &staged, deaf)
    }

    /// Serves `file` as `mnt/<its name>` (`mnt` made here), in `dir`,
    /// stalling memtrace and its helpers.
    fn serve(dir: OpenDir, mnt: &Path, file: &Path, deaf: bool) -> StallFs {
        StallFs::serve_stalling(dir, mnt, file, deaf, "memtrace")
    }

    /// [`StallFs::serve`], stalling the processes whose name starts with
    /// `comm` (ends with `$`: is `comm`).
    fn serve_stalling(dir: OpenDir, mnt: &Path, file: &Path, deaf: bool, comm: &str) -> StallFs {
        fs::create_dir(mnt).unwrap();
        let server_bin = build_fixture("stallfs", Variant::FramePointers);
        let mut args = vec![mnt.to_str().unwrap(), file.to_str().unwrap(), comm];
        if deaf {
            args.push("deaf");
        }
        let server = TestProcess::spawn_ready(&server_bin, &args);
        StallFs {
            lib: mnt.join(file.file_name().unwrap()),
            _unmount: Unmount(mnt.to_owned()),
            _server: server,
            _dir: dir,
        }
    }
}

/// lib_inner's 9 blocks of 333 bytes are all there, its frames unnamed (the
/// library was never read), main's named.
fn assert_stalled_library_site(r: &Report) {
    let site = r
        .sites()
        .iter()
        .find(|s| Report::blocks(s) == 9 && Report::bytes(s) == 9 * 333)
        .unwrap_or_else(|| panic!("no site of 9 x 333\n{}", r.summary()));
    let frames = Report::frames(site);
    assert!(frames[0].function.is_none(), "{frames:?}");
    assert!(frames.iter().any(|f| f.function() == "main"), "{frames:?}");
}

/// A library the target loads with dlopen from a FUSE filesystem that serves
/// the target but never answers memtrace (`stallfs`): capturing it blocks for
/// good, on a worker thread. Tracing still ends when the target exits, the
/// probes go, and the report has every block, saying what was cut short.
#[test]
fn a_library_on_a_fuse_mount_that_never_answers_memtrace() {
    require_root();
    let fs = StallFs::mount(false);
    let main = build_fixture("dlopen_main", Variant::FramePointers);
    let run = run_launch(
        &["-i", "500ms"],
        &[main.to_str().unwrap(), fs.lib.to_str().unwrap()],
    );
    run.assert_exit(0);
    let r = &run.report;
    let cut = r.0["cut_short"].to_string();
    assert!(cut.contains("modules: capturing"), "cut_short: {cut}");
    assert!(
        run.stderr.contains("memtrace: modules: capturing"),
        "{}",
        run.stderr
    );
    assert_stalled_library_site(r);
}

/// Processes left behind by memtrace to copy a file of a FUSE mount (their
/// standard input is the copy), with the BPF links and perf events each holds.
fn served_copy_helpers() -> Vec<(u32, usize)> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stdin = fs::read_link(format!("/proc/{pid}/fd/0")).unwrap_or_default();
        if stdin
            .to_string_lossy()
            .contains("memfd:memtrace-served-copy")
        {
            v.push((pid, probe_fds(pid)));
        }
    }
    v
}

/// Whether every thread of `pid` has ended (it is gone, or a zombie with no
/// thread left: a leader that exits first is a zombie while others live on).
fn ended(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        fs::read_to_string(t.path().join("stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
            })
            .unwrap_or(true)
    })
}

/// The same, with a server that ignores even the kernel's interrupt: a thread
/// in its request cannot end at all, and memtrace's process could not either
/// (before, it stayed in `exit_group` until the server was killed). memtrace
/// reads that library through a helper process it leaves behind instead: it
/// ends with its report, holds no probe, the helper none either, and the
/// report says the read was abandoned.
#[test]
fn a_fuse_server_deaf_even_to_interrupts_cannot_hold_memtrace() {
    require_root();
    let fs = StallFs::mount(true);
    let main = build_fixture("dlopen_main", Variant::FramePointers);
    let out = unique_path("json");
    let mut c = memtrace_command();
    c.args(["-i", "500ms", "-f", "json", "-o"])
        .arg(&out)
        .arg("--")
        // Leaks 10 s after loading the library: the helper is abandoned before.
        .args([main.to_str().unwrap(), fs.lib.to_str().unwrap(), "10"]);
    let mut m = Memtrace::spawn(c);
    let pid = m.pid();
    // Generous: the target runs 10 s; only a memtrace that cannot end fails.
    let deadline = Instant::now() + Duration::from_secs(40);
    while !ended(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !ended(pid) {
        // Reaping it would wait for the server: stop the server first.
        drop(fs);
        let _ = m.wait(RUN_LIMIT);
        panic!("memtrace did not end within 40 s; stderr:\n{}", m.stderr());
    }
    let helpers = served_copy_helpers();
    let status = m.wait(RUN_LIMIT);
    let stderr = m.stderr();
    assert_no_panic(&stderr);
    assert!(
        status.success(),
        "memtrace {}; stderr:\n{stderr}",
        describe_status(&status)
    );
    // The helper still waits on the server, holding none of memtrace's probes.
    assert!(!helpers.is_empty(), "no helper left waiting");
    assert!(
        helpers.iter().all(|&(_, probes)| probes == 0),
        "{helpers:?}"
    );
    let text =
        fs::read_to_string(&out).unwrap_or_else(|e| panic!("no report: {e}; stderr:\n{stderr}"));
    let _ = fs::remove_file(&out);
    let r = Report(serde_json::from_str(&text).expect("the report is JSON"));
    let cut = r.0["cut_short"].to_string();
    assert!(
        cut.contains("files: reads of 1 file(s) on FUSE mounts got no answer in 5 s"),
        "cut_short: {cut}"
    );
    assert_stalled_library_site(&r);
    // Killing the server frees the helper.
    drop(fs);
    let t = Instant::now();
    while helpers.iter().any(|&(p, _)| !ended(p)) {
        assert!(t.elapsed() < RUN_LIMIT, "a helper outlived the server");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The program's debug file (named by its `.gnu_debuglink`) in the `.debug`
/// directory next to it, which is a FUSE mount deaf to memtrace: memtrace
/// walks the path itself up to the mount, asks a helper for the file, gives
/// up on it after 5 s, and ends with every call counted and the functions
/// named from the program's symbol table. Before, memtrace's own lookup in
/// the mount kept it from ever ending.
#[test]
fn a_debug_file_on_a_deaf_fuse_mount_is_given_up() {
    require_root();
    let dir = OpenDir::new();
    let debug = dir.path().join("prog.debug");
    run_tool(
        "objcopy",
        &[
            "--only-keep-debug",
            leaks().to_str().unwrap(),
            debug.to_str().unwrap(),
        ],
    );
    let bin = dir.path().join("prog");
    run_tool(
        "objcopy",
        &[
            "--strip-debug",
            &format!("--add-gnu-debuglink={}", debug.display()),
            leaks().to_str().unwrap(),
            bin.to_str().unwrap(),
        ],
    );
    // Served from elsewhere: next to the program, it would be found first.
    let staged = dir.path().join("staging");
    fs::create_dir(&staged).unwrap();
    let staged = staged.join("prog.debug");
    fs::rename(&debug, &staged).unwrap();
    let mnt = dir.path().join(".debug");
    let fs = StallFs::serve(dir, &mnt, &staged, true);
    let mut target = TestProcess::spawn_ready(&bin, &["attach"]);
    let out = unique_path("json");
    let mut c = memtrace_command();
    c.args(["-d", "8s", "-f", "json", "-o"])
        .arg(&out)
        .args(["--pid", &target.pid().to_string()]);
    let mut m = Memtrace::spawn(c);
    m.wait_attached();
    target.go();
    let tally = target.wait_done();
    let pid = m.pid();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !ended(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !ended(pid) {
        drop(fs);
        let _ = m.wait(RUN_LIMIT);
        panic!("memtrace did not end within 40 s; stderr:\n{}", m.stderr());
    }
    let status = m.wait(RUN_LIMIT);
    let stderr = m.stderr();
    assert_no_panic(&stderr);
    assert!(
        status.success(),
        "memtrace {}; stderr:\n{stderr}",
        describe_status(&status)
    );
    let text =
        fs::read_to_string(&out).unwrap_or_else(|e| panic!("no report: {e}; stderr:\n{stderr}"));
    let _ = fs::remove_file(&out);
    let r = Report(serde_json::from_str(&text).expect("the report is JSON"));
    let cut = r.0["cut_short"].to_string();
    assert!(
        cut.contains("files: reads of 1 file(s) on FUSE mounts got no answer in 5 s"),
        "cut_short: {cut}"
    );
    assert_names_leaks(&r.0, &stderr);
    let run = Run {
        status,
        stdout: String::new(),
        stderr,
        report: r,
    };
    assert_counts_exact("debug file on FUSE", &run, &tally);
    target.finish_unharmed();
}

/// Waits for every thread of memtrace to end, for at most 40 s; if it does
/// not, stops the FUSE server first (reaping memtrace would wait for it) and
/// fails. Returns memtrace's status and stderr, checked for a clean end.
fn ended_within_40s(
    m: &mut Memtrace,
    fs: &mut Option<StallFs>,
) -> (std::process::ExitStatus, String) {
    let pid = m.pid();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !ended(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !ended(pid) {
        drop(fs.take());
        let _ = m.wait(RUN_LIMIT);
        panic!("memtrace did not end within 40 s; stderr:\n{}", m.stderr());
    }
    let status = m.wait(RUN_LIMIT);
    let stderr = m.stderr();
    assert_no_panic(&stderr);
    assert!(
        status.success(),
        "memtrace {}; stderr:\n{stderr}",
        describe_status(&status)
    );
    (status, stderr)
}

/// Waits for memtrace to say it attached, for at most 40 s, else stops the
/// FUSE server and fails (as [`ended_within_40s`]).
fn attached_within_40s(m: &mut Memtrace, fs: &mut Option<StallFs>) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !m.is_attached() && !ended(m.pid()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !m.is_attached() {
        drop(fs.take());
        let _ = m.wait(RUN_LIMIT);
        panic!(
            "memtrace did not attach within 40 s; stderr:\n{}",
            m.stderr()
        );
    }
}

/// The report memtrace wrote to `out`.
fn report_at(out: &Path, stderr: &str) -> Report {
    let text =
        fs::read_to_string(out).unwrap_or_else(|e| panic!("no report: {e}; stderr:\n{stderr}"));
    let _ = fs::remove_file(out);
    Report(serde_json::from_str(&text).expect("the report is JSON"))
}

/// The target maps a file of a FUSE mount that never answers memtrace, has
/// the page evicted (`MADV_PAGEOUT`), and points its link map there: reading
/// it from `/proc/PID/mem` would fault the page in from the server on
/// memtrace's thread, uninterruptibly (before, memtrace never ended). The
/// read is refused, counted and said; every call is still counted.
#[test]
fn a_fuse_page_the_target_evicted_is_not_read_from_its_memory() {
    require_root();
    let dir = OpenDir::new();
    let staged = dir.path().join("data.bin");
    fs::write(&staged, vec![0x5a_u8; 1 << 16]).unwrap();
    let mnt = dir.path().join("mnt");
    let mut fs = Some(StallFs::serve(dir, &mnt, &staged, true));
    let file = mnt.join("data.bin");
    let fixture = build_fixture("fuse_mapped", Variant::FramePointers);
    let mut target = TestProcess::spawn_ready(&fixture, &[file.to_str().unwrap()]);
    let out = unique_path("json");
    let mut c = memtrace_command();
    c.args(["-d", "5s", "-f", "json", "-o"])
        .arg(&out)
        .args(["--pid", &target.pid().to_string()]);
    let mut m = Memtrace::spawn(c);
    attached_within_40s(&mut m, &mut fs);
    target.go();
    let tally = target.wait_done();
    let (_, stderr) = ended_within_40s(&mut m, &mut fs);
    let r = report_at(&out, &stderr);
    let cut = r.0["cut_short"].to_string();
    assert!(
        cut.contains("memory: 1 read(s) of the target's memory refused: pages of a file on a FUSE mount not in memory"),
        "cut_short: {cut}"
    );
    let site = r
        .sites()
        .iter()
        .find(|s| Report::blocks(s) == 7 && Report::bytes(s) == 7 * 222)
        .unwrap_or_else(|| panic!("no site of 7 x 222\n{}", r.summary()));
    assert!(
        Report::frames(site)
            .iter()
            .any(|f| f.function() == "leak_one"),
        "{:?}",
        Report::frames(site)
    );
    assert_eq!(
        (
            r.total("alloc_calls"),
            r.total("free_calls"),
            r.total("outstanding_blocks"),
            r.total("outstanding_bytes"),
            r.total("dropped_events")
        ),
        (
            tally.get("alloc_calls"),
            tally.get("free_calls"),
            7,
            7 * 222,
            0
        ),
        "{}",
        r.summary()
    );
    target.finish_unharmed();
}

/// The allocator (jemalloc, `LD_PRELOAD`ed) is on a FUSE mount that
/// answers memtrace's copy helper but never memtrace itself: putting a
/// uprobe in it makes the kernel read the file on memtrace's own thread, so
/// it is not probed. Its entry points are listed as untraced with the reason,
/// stderr says why once, and memtrace ends on time with the rest traced.
#[test]
fn an_allocator_on_a_fuse_mount_is_not_probed() {
    require_root();
    let dir = OpenDir::new();
    let staged = dir.path().join("libjemalloc.so.2");
    fs::copy("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", &staged).unwrap();
    let mnt = dir.path().join("mnt");
    let mut fs = Some(StallFs::serve_stalling(
        dir,
        &mnt,
        &staged,
        true,
        "memtrace$",
    ));
    let lib = mnt.join("libjemalloc.so.2");
    let lib = lib.to_str().unwrap();
    // Without pvalloc, which jemalloc lacks (as tests/it/allocators.rs builds it).
    let bin = build_fixture_with(
        "leaks",
        Variant::FramePointers,
        Some("nopvalloc"),
        &["-DLEAKS_NO_PVALLOC"],
    );
    let mut target = TestProcess::spawn_env(&bin, &["attach"], &[("LD_PRELOAD", lib)]);
    target.wait_ready();
    let out = unique_path("json");
    let mut c = memtrace_command();
    c.args(["-d", "3s", "-f", "json", "-o"])
        .arg(&out)
        .args(["--pid", &target.pid().to_string()]);
    let mut m = Memtrace::spawn(c);
    attached_within_40s(&mut m, &mut fs);
    target.go();
    target.wait_done();
    let (_, stderr) = ended_within_40s(&mut m, &mut fs);
    let r = report_at(&out, &stderr);
    let modules = r.0["allocator"]["modules"].to_string();
    assert!(!modules.contains(lib), "probed: {modules}");
    assert!(modules.contains("libc.so.6"), "{modules}");
    let untraced = r.0["untraced_entry_points"]
        .as_array()
        .expect("untraced_entry_points");
    for name in ["malloc", "free", "calloc", "realloc"] {
        assert!(
            untraced.iter().any(|u| u["name"] == name
                && u["module"] == lib
                && u["reason"] == "on a FUSE mount: not probed"),
            "{name} not listed: {untraced:?}"
        );
    }
    let warned = format!(
        "memtrace: warning: {lib} is on a FUSE mount: its allocator functions are not probed"
    );
    assert_eq!(stderr.matches(&warned).count(), 1, "{stderr}");
    target.finish_unharmed();
}

/// A program whose file name holds a terminal's escape (clear screen), a bell,
/// a carriage return and a newline followed by a forged `memtrace: error:`
/// line. The name reaches the text report, the live summaries and stderr
/// (the program, its module path, its command name), always escaped.
#[test]
fn a_program_named_with_escapes_cannot_forge_text_output() {
    require_root();
    let dir = OpenDir::new();
    let bin = dir
        .path()
        .join("leaks\x1b[2J\x07\r\nmemtrace: error: forged");
    fs::copy(leaks(), &bin).unwrap();
    let mut c = memtrace_command();
    c.args(["-i", "300ms", "-v", "--"]).arg(&bin).arg("launch");
    let out = run_memtrace(c);
    assert_no_panic(&out.stderr);
    assert_eq!(out.code(), Some(7), "{}", out.stderr);
    for (what, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(
            !text.contains(['\x1b', '\x07', '\r']),
            "a raw control character on {what}: {text:?}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("memtrace: error: forged")),
            "a forged line on {what}: {text}"
        );
    }
    // Printed, as escapes: the text report names the program's module.
    assert!(
        out.stdout
            .contains("leaks\\x1b[2J\\x07\\x0d\\x0amemtrace: error: forged"),
        "{}",
        out.stdout
    );
}

/// `memtrace diff` on what no report is: an endless device, a FIFO (whose
/// opening would block), a file larger than any report, counts that are
/// negative or beyond `i64`: each refused at once with an error that says why.
#[test]
fn diff_refuses_unbounded_inputs_and_impossible_counts() {
    require_memtrace();
    let dir = OpenDir::new();
    let good = dir.path().join("good.json");
    fs::write(&good, r#"{"schema": "memtrace-report/1", "sites": []}"#).unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let huge = dir.path().join("huge.json");
    fs::File::create(&huge).unwrap().set_len(513 << 20).unwrap();
    let with_count = |name: &str, n: &str| {
        let p = dir.path().join(name);
        let site =
            format!(r#"{{"frames": [], "outstanding_bytes": {n}, "outstanding_blocks": 1}}"#);
        fs::write(
            &p,
            format!(r#"{{"schema": "memtrace-report/1", "sites": [{site}]}}"#),
        )
        .unwrap();
        p
    };
    let negative = with_count("negative.json", "-1");
    let too_big = with_count("too_big.json", "18446744073709551615");
    for (path, says) in [
        (Path::new("/dev/zero"), "not a regular file"),
        (&fifo, "not a regular file"),
        (&huge, "is larger than memtrace diff reads"),
        (
            &negative,
            "`outstanding_bytes` is -1: not a count memtrace writes",
        ),
        (
            &too_big,
            "`outstanding_bytes` is 18446744073709551615: not a count memtrace writes",
        ),
    ] {
        // (run_memtrace fails a run that does not end.)
        let mut c = memtrace_command();
        c.arg("diff").arg(path).arg(&good);
        let out = run_memtrace(c);
        assert_error(&out, 1, &[says]);
    }
}

// ---- malformed files of the target's own ---------------------------------------

/// The file range of section `name` of the ELF64 file `data` (little endian).
fn section_range(data: &[u8], name: &str) -> std::ops::Range<usize> {
    let u16_at = |o: usize| u16::from_le_bytes(data[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let names = u64_at(header(shstrndx) + 24);
    (0..shnum)
        .map(header)
        .find(|&h| {
            let at = names + u32_at(h);
            data[at..].split(|&b| b == 0).next() == Some(name.as_bytes())
        })
        .map(|h| {
            let off = u64_at(h + 24);
            off..off + u64_at(h + 32)
        })
        .unwrap_or_else(|| panic!("no section {name}"))
}

/// A copy of the leaks fixture in `dir`, changed by `patch`.
fn patched_leaks(dir: &Path, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut data = fs::read(leaks()).unwrap();
    patch(&mut data);
    let bin = dir.join(name);
    fs::write(&bin, data).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Traces `bin attach` doing its work; the run and the fixture's tally.
fn trace_leaks_at(bin: &Path) -> (Run, Tally) {
    let AttachRun {
        run,
        tally,
        mut target,
    } = run_attach(bin, &["attach"], &[]);
    run.assert_exit(0);
    target.finish_unharmed();
    (run, tally)
}

/// Every call, block and free counted, whatever memtrace made of the files.
fn assert_counts_exact(what: &str, run: &Run, tally: &Tally) {
    let r = &run.report;
    assert_eq!(
        (
            r.total("alloc_calls"),
            r.total("free_calls"),
            r.total("outstanding_blocks"),
            r.total("outstanding_bytes"),
            r.total("dropped_events")
        ),
        (
            tally.get("alloc_calls"),
            tally.get("free_calls"),
            leaks::total().0,
            leaks::total().1,
            0
        ),
        "{what}: {:?}\n{}",
        tally.0,
        r.summary()
    );
}

/// The program's `.eh_frame` garbage, or claiming a 1 TiB entry (the 64-bit
/// length form): the table is refused, the stacks walked with frame pointers,
/// and every call still counted.
#[test]
fn a_corrupt_or_huge_eh_frame_is_survived() {
    require_root();
    let dir = OpenDir::new();
    let garbage = patched_leaks(dir.path(), "garbage", |d| {
        let r = section_range(d, ".eh_frame");
        d[r].fill(0xa5);
    });
    let huge = patched_leaks(dir.path(), "huge", |d| {
        let r = section_range(d, ".eh_frame");
        d[r.start..r.start + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        d[r.start + 4..r.start + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    });
    for (what, bin) in [("garbage", garbage), ("huge", huge)] {
        let (run, tally) = trace_leaks_at(&bin);
        assert_no_panic(&run.stderr);
        assert_counts_exact(what, &run, &tally);
        let without = run.report.0["unwind"]["modules_without_tables"].to_string();
        assert!(without.contains(bin.to_str().unwrap()), "{what}: {without}");
        for site in leaks::CORE {
            site.assert_in(&run.report);
        }
    }
}

/// The program's `.debug_info` compressed, its header claiming 1 TiB once
/// inflated: refused before any memory is taken for it; the functions are
/// still named, from the symbol table.
#[test]
fn a_1tib_compressed_section_claim_is_refused() {
    require_root();
    let dir = OpenDir::new();
    let z = dir.path().join("z");
    run_tool(
        "objcopy",
        &[
            "--compress-debug-sections=zlib",
            leaks().to_str().unwrap(),
            z.to_str().unwrap(),
        ],
    );
    let mut data = fs::read(&z).unwrap();
    // Elf64_Chdr: ch_type, ch_reserved, then ch_size.
    let r = section_range(&data, ".debug_info");
    data[r.start + 8..r.start + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let bin = dir.path().join("claim");
    fs::write(&bin, data).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let (run, tally) = trace_leaks_at(&bin);
    assert_no_panic(&run.stderr);
    assert_counts_exact("1 TiB claim", &run, &tally);
    let r = &run.report;
    let lvl3: Vec<Frame> = r
        .sites()
        .iter()
        .flat_map(Report::frames)
        .filter(|f| f.function() == "lvl3")
        .collect();
    assert!(!lvl3.is_empty(), "{}", r.summary());
    assert!(
        lvl3.iter().all(|f| f.line.is_none()),
        "lines from a refused .debug_info: {lvl3:?}"
    );
}

/// A `.gnu_debuglink` naming `../p.debug`: the file there (a real match,
/// CRC included) is never looked at; the refusal is counted, and the
/// functions are named from the symbol table alone.
#[test]
fn a_debuglink_climbing_out_with_dotdot_is_refused() {
    require_root();
    let dir = OpenDir::new();
    let inner = dir.path().join("inner");
    fs::create_dir(&inner).unwrap();
    // `abcp.debug` as objcopy stores it, then renamed `../p.debug` in the
    // section: same length, same CRC of the same file, now one level up.
    let debug = inner.join("abcp.debug");
    run_tool(
        "objcopy",
        &[
            "--only-keep-debug",
            leaks().to_str().unwrap(),
            debug.to_str().unwrap(),
        ],
    );
    let stripped = inner.join("stripped");
    run_tool(
        "objcopy",
        &[
            "--strip-debug",
            &format!("--add-gnu-debuglink={}", debug.display()),
            leaks().to_str().unwrap(),
            stripped.to_str().unwrap(),
        ],
    );
    let mut data = fs::read(&stripped).unwrap();
    let r = section_range(&data, ".gnu_debuglink");
    assert_eq!(&data[r.start..r.start + 10], b"abcp.debug");
    data[r.start..r.start + 3].copy_from_slice(b"../");
    fs::rename(&debug, dir.path().join("p.debug")).unwrap();
    let bin = inner.join("prog");
    fs::write(&bin, data).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let (run, tally) = trace_leaks_at(&bin);
    assert_counts_exact("debuglink ../", &run, &tally);
    assert_eq!(
        refused(&run.report.0, "debuglink_not_a_file_name"),
        1,
        "{}",
        run.report.0["drops"]
    );
    let lvl3: Vec<Frame> = run
        .report
        .sites()
        .iter()
        .flat_map(Report::frames)
        .filter(|f| f.function() == "lvl3")
        .collect();
    assert!(!lvl3.is_empty(), "{}", run.report.summary());
    assert!(lvl3.iter().all(|f| f.line.is_none()), "{lvl3:?}");
}
