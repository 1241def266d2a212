//! Continuous mode: `--snapshot-every` writes the report as it stands into a
//! directory while tracing goes on, rotates it, and `memtrace diff DIR`
//! compares the two newest; a directory that cannot take a snapshot costs the
//! snapshot, not the run.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use memtrace_tests::*;
use serde_json::Value;

const EVERY: &str = "300ms";
const EVERY_S: f64 = 0.3;
const KEEP: usize = 3;

/// The snapshot files of `dir` with extension `ext`, by sequence number.
fn snapshot_files(dir: &Path, ext: &str) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let rest = name.strip_prefix("snapshot-")?.strip_suffix(ext)?;
            let seq = rest.split('-').next()?.parse().ok()?;
            Some((seq, dir.join(&name)))
        })
        .collect();
    out.sort();
    out
}

fn newest_seq(dir: &Path) -> u64 {
    snapshot_files(dir, ".json").last().map_or(0, |s| s.0)
}

/// Waits until `dir` holds a JSON snapshot numbered `seq` or higher.
fn wait_for_snapshot(dir: &Path, seq: u64, memtrace: &Memtrace) {
    let until = Instant::now() + WORK_TIMEOUT;
    while newest_seq(dir) < seq {
        assert!(
            Instant::now() < until,
            "no snapshot {seq} in {}; memtrace's stderr:\n{}",
            dir.display(),
            memtrace.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn fresh_dir() -> PathBuf {
    let dir = unique_path("snapshots");
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A site's stack as `function:line`, innermost first.
fn stack(site: &Value) -> Vec<String> {
    Report::frames(site)
        .iter()
        .map(|f| format!("{}:{}", f.function(), f.line.unwrap_or(0)))
        .collect()
}

/// Every site as (stack, blocks, bytes), sorted.
fn sites(r: &Report) -> Vec<(Vec<String>, u64, u64)> {
    let mut v: Vec<_> = r
        .sites()
        .iter()
        .map(|s| (stack(s), Report::blocks(s), Report::bytes(s)))
        .collect();
    v.sort();
    v
}

#[test]
fn snapshots_come_every_interval_rotate_and_agree_with_the_final_report() {
    require_root();
    let dir = fresh_dir();
    let exe = build_fixture("leaks", Variant::FramePointers);
    let pprof = unique_path("pb.gz");
    let mut target = TestProcess::spawn(&exe, &["attach"]);
    target.wait_ready();
    let dir_arg = dir.display().to_string();
    let pprof_arg = pprof.display().to_string();
    let session = attach(
        &target,
        &[
            "--snapshot-every",
            EVERY,
            "--snapshot-dir",
            &dir_arg,
            "--keep",
            "3",
            "-f",
            "pprof",
            "-o",
            &pprof_arg,
        ],
    );
    target.go();
    target.wait_done();
    // Two snapshots taken wholly after the work (both show its end state),
    // and more than --keep in all (rotation has removed some).
    let after = (newest_seq(&dir) + 2).max(KEEP as u64 + 2);
    wait_for_snapshot(&dir, after, &session.memtrace);
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let _ = fs::remove_file(&pprof);
    let fin = &run.report;

    // At the interval: each due snapshot was written, or counted as skipped.
    let stats = &fin.0["snapshots"];
    let (written, failed, skipped) = (
        u64_field(stats, "written"),
        u64_field(stats, "failed"),
        u64_field(stats, "skipped"),
    );
    let due = (fin.0["duration_s"].as_f64().unwrap() / EVERY_S).floor() as u64;
    assert!(
        (written + failed + skipped).abs_diff(due) <= 1,
        "{written} written, {failed} failed, {skipped} skipped; {due} were due: {stats}"
    );
    assert_eq!(
        (failed, u64_field(stats, "keep")),
        (0, KEEP as u64),
        "{stats}"
    );
    assert_eq!(stats["dir"], dir_arg.as_str());

    // Rotation: the newest KEEP, each whole (JSON and pprof), nothing half-written.
    assert!(written > KEEP as u64, "{stats}");
    let json = snapshot_files(&dir, ".json");
    let gz = snapshot_files(&dir, ".pb.gz");
    let seqs: Vec<u64> = json.iter().map(|s| s.0).collect();
    assert_eq!(
        seqs,
        (written - 2..=written).collect::<Vec<_>>(),
        "{json:?}"
    );
    assert_eq!(gz.iter().map(|s| s.0).collect::<Vec<_>>(), seqs, "{gz:?}");
    for (_, p) in &gz {
        assert_eq!(
            &fs::read(p).unwrap()[..2],
            &[0x1f, 0x8b],
            "{} is gzip",
            p.display()
        );
    }
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        2 * KEEP + 1,
        "snapshots and the lock only: {names:?}"
    );

    // The newest snapshot: taken while tracing, the fixture's leaks exact,
    // and what the final report says of the same moment.
    let newest = Report(read_json(&json[KEEP - 1].1));
    assert_eq!(newest.0["end_reason"], "snapshot");
    assert_eq!(newest.target()["exited"], false);
    for site in leaks::CORE {
        site.assert_in(&newest);
    }
    for key in [
        "outstanding_blocks",
        "outstanding_bytes",
        "alloc_calls",
        "free_calls",
    ] {
        assert_eq!(newest.total(key), fin.total(key), "totals.{key}");
    }
    assert_eq!(
        sites(&newest),
        sites(fin),
        "sites of the newest snapshot and the final report"
    );

    // `memtrace diff DIR`: the two newest, both after the work: nothing moved.
    let out = Command::new(require_memtrace())
        .args(["diff", "-f", "json"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "comparing {} with {}",
            json[KEEP - 2].1.display(),
            json[KEEP - 1].1.display()
        )),
        "{stderr}"
    );
    let diff: Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &diff["totals"];
    for key in [
        "grew",
        "new",
        "shrank",
        "vanished",
        "size_diff",
        "count_diff",
    ] {
        assert_eq!(t[key], 0, "diff totals.{key}: {t}");
    }
    assert_eq!(
        u64_field(t, "unchanged"),
        newest.sites().len() as u64,
        "{t}"
    );
    let _ = fs::remove_dir_all(&dir);
    target.finish_unharmed();
}

/// Unmounts a tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_full_disk_costs_the_snapshot_not_the_run() {
    require_root();
    let dir = fresh_dir();
    fs::create_dir_all(&dir).unwrap();
    // One page: room for the lock file, not for a report.
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4k", "tmpfs"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs on {}", dir.display());
    let _mount = Mount(dir.clone());
    let exe = build_fixture("leaks", Variant::FramePointers);
    let mut target = TestProcess::spawn(&exe, &["attach"]);
    target.wait_ready();
    let dir_arg = dir.display().to_string();
    let session = attach(
        &target,
        &["--snapshot-every", EVERY, "--snapshot-dir", &dir_arg],
    );
    target.go();
    target.wait_done();
    let until = Instant::now() + WORK_TIMEOUT;
    while !session.memtrace.stderr().contains("not written") {
        assert!(Instant::now() < until, "{}", session.memtrace.stderr());
        thread::sleep(Duration::from_millis(50));
    }
    // More failures, so that the warning had the chance to be said again.
    thread::sleep(Duration::from_secs_f64(EVERY_S * 10.0));
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let stats = &run.report.0["snapshots"];
    assert_eq!(u64_field(stats, "written"), 0, "{stats}");
    assert!(u64_field(stats, "failed") >= 2, "{stats}");
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("not written"))
        .collect();
    assert_eq!(warnings.len(), 1, "said once:\n{}", run.stderr);
    assert!(
        warnings[0].starts_with("memtrace: warning: snapshot snapshot-00000001-")
            && warnings[0].contains("No space left on device"),
        "{}",
        warnings[0]
    );
    // Nothing half-written is left behind.
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [".memtrace.lock"]);
    for site in leaks::CORE {
        site.assert_in(&run.report);
    }
    target.finish_unharmed();
}

#[test]
fn diff_of_a_directory_needs_two_snapshots() {
    let dir = fresh_dir();
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("snapshot-00000001-20260101T000000Z.json"), "{}").unwrap();
    let out = Command::new(require_memtrace())
        .arg("diff")
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("holds 1 JSON snapshot (snapshot-*.json): a diff needs two"),
        "{stderr}"
    );
    let out = Command::new(require_memtrace())
        .args(["diff", "a.json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = fs::remove_dir_all(&dir);
}

/// `GET path` over plain HTTP/1.0: the body, if the status is 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_string())
}

/// The value of the one sample of `name` with `label` (`verdict="leak"`).
fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn the_newest_snapshots_verdicts_are_metrics() {
    require_root();
    let dir = fresh_dir();
    let dir_arg = dir.display().to_string();
    let exe = build_fixture("leaks", Variant::FramePointers);
    let mut target = TestProcess::spawn(&exe, &["attach"]);
    target.wait_ready();
    let session = attach(
        &target,
        &[
            "-i",
            EVERY,
            "--listen",
            "127.0.0.1:0",
            "--snapshot-every",
            EVERY,
            "--snapshot-dir",
            &dir_arg,
        ],
    );
    let stderr = session.memtrace.stderr();
    let addr = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("memtrace: serving http://")?
                .split('/')
                .next()
        })
        .unwrap_or_else(|| panic!("no serving line:\n{stderr}"))
        .to_string();
    target.go();
    target.wait_done();
    wait_for_snapshot(&dir, newest_seq(&dir) + 2, &session.memtrace);
    // The metrics name the snapshot they come from by its time; its file may
    // still be on its way.
    let until = Instant::now() + WORK_TIMEOUT;
    let (text, snapshot) = loop {
        assert!(Instant::now() < until, "no snapshot matches the metrics");
        let text = http_get(&addr, "/metrics").expect("GET /metrics");
        let t = metric(&text, "memtrace_verdicts_traced_seconds", "")
            .unwrap_or_else(|| panic!("no verdicts in the metrics:\n{text}"));
        let found = snapshot_files(&dir, ".json")
            .into_iter()
            .map(|(_, p)| read_json(&p))
            .find(|s| (s["duration_s"].as_f64().unwrap() - t).abs() < 0.0006);
        if let Some(s) = found {
            break (text, s);
        }
        thread::sleep(Duration::from_millis(50));
    };
    let counts = &snapshot["verdicts"];
    let mut sum = 0;
    for verdict in ["leak", "growing", "stable", "transient", "unknown"] {
        let label = format!("verdict=\"{verdict}\"");
        let got = metric(&text, "memtrace_sites_by_verdict", &label);
        assert_eq!(
            got,
            Some(u64_field(counts, verdict) as f64),
            "{verdict}:\n{text}"
        );
        sum += u64_field(counts, verdict);
    }
    assert_eq!(sum, Report(snapshot.clone()).sites().len() as u64);
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let _ = fs::remove_dir_all(&dir);
    target.finish_unharmed();
}
