//! The continuous-mode figure of `cargo xtask bench`: memtrace's own memory
//! over thousands of snapshot intervals, accelerated.
//!
//! tests/fixtures/churn.c keeps 16 blocks and then churns malloc/free pairs
//! until told to stop; memtrace traces it by pid with a live summary and a
//! snapshot (JSON and pprof) every 100 ms, the newest 5 kept: days of a
//! service's snapshots at 5 minutes, in minutes. memtrace's VmRSS is read
//! once early (after the first snapshots), in the middle and at the end of
//! the snapshots asked for; bounded memory shows as an end no larger than
//! the middle, give or take the allocator's slack.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::json::Json;
use super::proc::{Proc, Stream};
use super::targets::pass;

const EVERY_MS: u64 = 100;
const KEEP: u64 = 5;
/// RSS is read after this many snapshots first: the symbolizer's debug info
/// and the maps' first reads are in by then.
const EARLY: u64 = 20;
/// Memory is bounded if the end is within this of the middle.
const TARGET_GROWTH_KIB: u64 = 2048;

/// What one long run measured.
pub(super) struct Continuous {
    pub(super) asked: u64,
    pub(super) wall: Duration,
    /// (snapshots written by then, VmRSS KiB): early, middle, end.
    pub(super) rss: Vec<(u64, u64)>,
    pub(super) hwm_kib: u64,
    pub(super) written: u64,
    pub(super) failed: u64,
    pub(super) skipped: u64,
    /// Snapshot files in the directory at the end (JSON and pprof).
    pub(super) files_left: usize,
}

/// Builds the fixture and runs `snapshots` snapshot intervals.
pub(super) fn run(
    root: &Path,
    bench_dir: &Path,
    memtrace: &Path,
    snapshots: u64,
) -> Result<Continuous> {
    let exe = bench_dir.join("churn");
    crate::util::output(
        Command::new("gcc")
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-Wall"])
            .arg(format!("-I{}", root.join("tests/fixtures").display()))
            .arg("-o")
            .arg(&exe)
            .arg(root.join("tests/fixtures/churn.c")),
    )
    .context("compiling tests/fixtures/churn.c")?;
    let dir = bench_dir.join("continuous-snapshots");
    let _ = fs::remove_dir_all(&dir);
    let final_json = bench_dir.join("continuous-final.json");
    let mut target = Proc::spawn("churn fixture", Command::new(&exe), true, false)?;
    target.wait_line(Duration::from_secs(30), "ready", |s, l| {
        s == Stream::Stdout && l == "ready"
    })?;
    let every = format!("{EVERY_MS}ms");
    let mut cmd = Command::new(memtrace);
    cmd.args([
        "-i",
        &every,
        "--snapshot-every",
        &every,
        "--keep",
        &KEEP.to_string(),
    ])
    .arg("--snapshot-dir")
    .arg(&dir)
    .args(["-f", "pprof", "-o"])
    .arg(bench_dir.join("continuous-final.pb.gz"))
    .args(["-f", "json", "-o"])
    .arg(&final_json)
    .args(["--pid", &target.pid().to_string()]);
    let mut m = Proc::spawn("memtrace", cmd, false, true)?;
    m.wait_line(Duration::from_secs(120), "memtrace: attached", |s, l| {
        s == Stream::Stderr && l.starts_with("memtrace: attached")
    })?;
    target.send(b"g")?;
    target.wait_line(Duration::from_secs(300), "done", |s, l| {
        s == Stream::Stdout && l.starts_with("done")
    })?;
    let start = Instant::now();
    let rss = watch(&mut m, &dir, snapshots)?;
    let wall = start.elapsed();
    let hwm_kib = status_kib(m.pid(), "VmHWM:").unwrap_or(0);
    let files_left = snapshot_files(&dir).len();
    let stopped = m.stop(Duration::from_secs(120))?;
    if stopped.killed || !stopped.status.success() {
        bail!("memtrace ended with {}:\n{}", stopped.status, m.tail(30));
    }
    let _ = target.send(b"x");
    let _ = target.finish(Duration::from_secs(10));
    let report = Json::parse(&fs::read_to_string(&final_json).context("the final report")?)?;
    let count = |k: &str| {
        report
            .get("snapshots")
            .and_then(|s| s.get(k))
            .and_then(Json::as_u64)
    };
    let _ = fs::remove_dir_all(&dir);
    Ok(Continuous {
        asked: snapshots,
        wall,
        rss,
        hwm_kib,
        written: count("written").context("the final report has no snapshots.written")?,
        failed: count("failed").unwrap_or(0),
        skipped: count("skipped").unwrap_or(0),
        files_left,
    })
}

/// Reads memtrace's RSS early, in the middle and at the end of `snapshots`
/// snapshots (by the numbers of the files it writes).
fn watch(m: &mut Proc, dir: &Path, snapshots: u64) -> Result<Vec<(u64, u64)>> {
    let marks = [EARLY.min(snapshots), snapshots / 2, snapshots];
    let deadline =
        Instant::now() + Duration::from_millis(EVERY_MS * snapshots * 4) + Duration::from_secs(60);
    let mut rss = Vec::new();
    let mut last_said = 0;
    while rss.len() < marks.len() {
        m.drain();
        if m.try_wait()?.is_some() {
            bail!("memtrace exited while tracing:\n{}", m.tail(30));
        }
        if Instant::now() > deadline {
            bail!(
                "memtrace wrote {} of {snapshots} snapshots in time",
                newest(dir)
            );
        }
        let n = newest(dir);
        if n >= marks[rss.len()] {
            rss.push((
                n,
                status_kib(m.pid(), "VmRSS:").context("memtrace's VmRSS")?,
            ));
        }
        if n >= last_said + snapshots / 10 {
            eprintln!("bench:   {n} of {snapshots} snapshots");
            last_said = n;
        }
        thread::sleep(Duration::from_millis(EVERY_MS / 2));
    }
    Ok(rss)
}

fn snapshot_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("snapshot-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The number of the newest snapshot in `dir` (0: none yet).
fn newest(dir: &Path) -> u64 {
    snapshot_files(dir)
        .iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            name.strip_prefix("snapshot-")?
                .split('-')
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// A `KEY: N kB` line of /proc/PID/status, in KiB.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

impl Continuous {
    fn growth_kib(&self) -> i64 {
        let mid = self.rss.get(1).map_or(0, |r| r.1 as i64);
        let end = self.rss.get(2).map_or(0, |r| r.1 as i64);
        end - mid
    }

    pub(super) fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "## Continuous snapshots\n");
        let _ = writeln!(
            o,
            "tests/fixtures/churn.c churning malloc/free pairs, traced by pid with `-i {EVERY_MS}ms \
             --snapshot-every {EVERY_MS}ms --keep {KEEP} -f pprof` (JSON and pprof each time): \
             {} snapshot intervals in {:.0} s; {} written, {} skipped (the one before still \
             being written or built), {} failed; {} snapshot files left.\n",
            self.asked,
            self.wall.as_secs_f64(),
            self.written,
            self.skipped,
            self.failed,
            self.files_left
        );
        let _ = writeln!(
            o,
            "| memtrace's RSS | after snapshot | MiB |\n|---|--:|--:|"
        );
        for (what, (n, kib)) in ["early", "middle", "end"].iter().zip(&self.rss) {
            let _ = writeln!(o, "| {what} | {n} | {:.1} |", *kib as f64 / 1024.0);
        }
        let _ = writeln!(
            o,
            "| peak (VmHWM) | | {:.1} |",
            self.hwm_kib as f64 / 1024.0
        );
        o
    }

    pub(super) fn targets(&self) -> Vec<String> {
        let growth = self.growth_kib();
        vec![format!(
            "continuous snapshots: memtrace's RSS grew {growth} KiB from snapshot {} to {} \
             (target ≤ {TARGET_GROWTH_KIB} KiB): {}; {} files kept (target {}): {}",
            self.rss.get(1).map_or(0, |r| r.0),
            self.rss.get(2).map_or(0, |r| r.0),
            pass(growth as f64, TARGET_GROWTH_KIB as f64),
            self.files_left,
            2 * KEEP,
            pass(self.files_left as f64, (2 * KEEP) as f64),
        )]
    }
}
