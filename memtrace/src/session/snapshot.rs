//! `--snapshot-every DUR`: the report as it stands, written every DUR into
//! `--snapshot-dir` while tracing goes on, the newest `--keep` kept.
//!
//! The watch loop builds each snapshot (it owns the maps and the symbolizer)
//! and hands it to a writer thread of its own, so that a slow or full disk
//! never holds tracing: while the writer is still busy with one snapshot, the
//! next is skipped and counted. Each file is written under a temporary name
//! and renamed into place, the JSON last, so a reader never sees half a file
//! and a JSON present means its other formats are there too. A snapshot that
//! cannot be written is removed whole, said on stderr the first time, and
//! counted in the report's `snapshots`.
//!
//! Names: `snapshot-<seq>-<UTC time>.<ext>`, `seq` eight digits or more,
//! counting on from the highest one in the directory, so the names sort in the
//! order they were taken even across runs and clock steps. One run at a time
//! writes to a directory (a lock file says so).
use std::{
    fs::File,
    io::Write,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};

use super::{
    Format, Options, Session,
    build::{Purpose, ReportMeta, build_report},
    output::emit,
};
use crate::{
    escape::Escaped,
    kernel::collect::monotonic_ns,
    process::stat as procstat,
    report::{Report, SnapshotStats, metrics::SiteVerdicts},
};

/// `--snapshot-dir`'s default, relative to where memtrace runs (as `-o` is).
pub const DEFAULT_DIR: &str = "memtrace-snapshots";
/// `--keep`'s default: an hour of snapshots taken every 5 minutes; at ten
/// thousand sites a JSON snapshot is tens of megabytes.
pub const DEFAULT_KEEP: usize = 12;

const PREFIX: &str = "snapshot-";
const LOCK_FILE: &str = ".memtrace.lock";
/// Temporary files start with it (and are hidden from `ls DIR/*.json`).
const TEMP_PREFIX: &str = ".snapshot-";

/// What `--snapshot-every` asks for.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub every: Duration,
    pub dir: PathBuf,
    pub keep: usize,
}

/// A snapshot to write: the report, and its name without extension.
struct Job {
    report: Report,
    stem: String,
}

/// The snapshots of a session: the directory (locked), the writer thread,
/// and their counts.
pub(super) struct Snapshots {
    /// Held for the session: the directory's lock.
    _lock: File,
    jobs: Option<SyncSender<Job>>,
    /// Disconnected when the writer thread has ended.
    writer_done: Receiver<()>,
    stats: Arc<Mutex<SnapshotStats>>,
    /// From a snapshot handed over until the writer is done with it.
    in_flight: Arc<AtomicBool>,
    next_seq: u64,
}

impl Snapshots {
    /// Creates and locks the directory (before attaching, so a directory that
    /// cannot be written fails at once), clears what a run that was killed
    /// left half-written, and starts the writer.
    pub(super) fn open(opts: &SnapshotOptions, formats: Vec<Format>) -> Result<Snapshots> {
        let dir = &opts.dir;
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "--snapshot-dir {}: cannot create the directory",
                dir.display()
            )
        })?;
        let lock = lock_dir(dir)?;
        let names = file_names(dir)?;
        for name in names.iter().filter(|n| n.starts_with(TEMP_PREFIX)) {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let next_seq = names
            .iter()
            .filter_map(|n| seq_of(n))
            .max()
            .map_or(1, |s| s + 1);
        let stats = Arc::new(Mutex::new(SnapshotStats {
            dir: dir.display().to_string(),
            every_s: opts.every.as_secs_f64(),
            keep: opts.keep as u64,
            ..Default::default()
        }));
        let (jobs, rx) = mpsc::sync_channel::<Job>(1);
        let in_flight = Arc::new(AtomicBool::new(false));
        let (done_tx, writer_done) = mpsc::channel::<()>();
        let writer = Writer {
            dir: dir.clone(),
            keep: opts.keep,
            formats,
            stats: stats.clone(),
            in_flight: in_flight.clone(),
        };
        std::thread::Builder::new()
            .name("memtrace-snapshots".into())
            .spawn(move || {
                let _done = done_tx;
                for job in rx {
                    writer.write(job);
                }
            })
            .context("starting the snapshot writer thread")?;
        Ok(Snapshots {
            _lock: lock,
            jobs: Some(jobs),
            writer_done,
            stats,
            in_flight,
            next_seq,
        })
    }

    /// Whether the writer is done with the snapshot before (else the next
    /// one is skipped: no use building it).
    pub(super) fn writer_idle(&self) -> bool {
        !self.in_flight.load(Ordering::Acquire)
    }

    /// Hands `report` to the writer; counts it as skipped if the writer is
    /// still busy with the one before.
    pub(super) fn submit(&mut self, report: Report, now: SystemTime) {
        let stem = stem(self.next_seq, now);
        let Some(jobs) = &self.jobs else { return };
        self.in_flight.store(true, Ordering::Release);
        match jobs.try_send(Job { report, stem }) {
            Ok(()) => self.next_seq += 1,
            // (Not while `writer_idle` said so: the writer empties the slot
            // before it says it is done.)
            Err(TrySendError::Full(_)) => self.count_skipped(1),
            Err(TrySendError::Disconnected(_)) => {
                log::warn!("the snapshot writer has stopped");
                self.jobs = None;
            }
        }
    }

    /// Counts `n` snapshots not taken.
    pub(super) fn count_skipped(&self, n: u64) {
        self.lock_stats().skipped += n;
    }

    /// The counts so far.
    pub(super) fn stats(&self) -> SnapshotStats {
        self.lock_stats().clone()
    }

    fn lock_stats(&self) -> std::sync::MutexGuard<'_, SnapshotStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets the writer finish the snapshot under way, waiting at most `wait`;
    /// returns the final counts, and a note if it was not done in time.
    pub(super) fn finish(&mut self, wait: Duration) -> (SnapshotStats, Option<String>) {
        self.jobs = None;
        let note = match self.writer_done.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => Some(format!(
                "snapshots: the last one was still being written to {} after {}s; it may be \
                 missing (its temporary files are cleared by the next run)",
                self.lock_stats().dir,
                wait.as_secs()
            )),
            _ => None,
        };
        (self.stats(), note)
    }
}

/// Builds the report as it stands and hands it to the writer. Tracing goes
/// on: the probes stay, and the history and counters are left as they are.
pub(super) fn take(opts: &Options, s: &mut Session) {
    let Some(snaps) = &s.snapshots else { return };
    if !snaps.writer_idle() {
        snaps.count_skipped(1);
        return;
    }
    let now = SystemTime::now();
    let meta = ReportMeta {
        started_at: s.started_at,
        ended_at: now,
        duration: s.trace_start.elapsed(),
        end_reason: "snapshot",
        end_ns: monotonic_ns(),
        exited: false,
        exit_status: None,
        end_process: procstat::read(s.at.pid).ok(),
        cut_short: super::finish::cut_short(s),
        attach: s.attach_times.clone(),
        snapshots: Some(snaps.stats()),
        lineage: Some(super::children::lineage(opts, s)),
    };
    let built = build_report(opts, s, meta, Purpose::Snapshot);
    let Some(snaps) = s.snapshots.as_mut() else {
        return;
    };
    match built {
        Ok(report) => {
            if let Some(srv) = &s.server {
                srv.published.set_verdicts(SiteVerdicts {
                    counts: report.verdicts,
                    traced_seconds: report.duration_s,
                });
            }
            snaps.submit(report, now)
        }
        Err(e) => fail(&mut snaps.lock_stats(), "(not built)", &e),
    }
}

/// Counts a snapshot that failed; says the first failure on stderr.
fn fail(stats: &mut SnapshotStats, stem: &str, e: &anyhow::Error) {
    if stats.failed == 0 {
        eprintln!(
            "memtrace: warning: snapshot {} not written: {}; tracing goes on, and the \
             snapshots that fail are counted in the report",
            Escaped(stem),
            Escaped(&format!("{e:#}"))
        );
    }
    stats.failed += 1;
}

/// Takes the directory's lock, or says which run holds it.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| {
            format!(
                "--snapshot-dir {}: cannot write there: check it is a directory memtrace \
                 may write to",
                dir.display()
            )
        })?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "--snapshot-dir {}: another memtrace writes snapshots there; give each run \
                 a directory of its own",
                dir.display()
            );
        }
        return Err(e).with_context(|| format!("locking {}", path.display()));
    }
    Ok(file)
}

fn file_names(dir: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect())
}

/// A snapshot's name without its extension: its sequence number and the UTC
/// time it was taken, to the second.
fn stem(seq: u64, at: SystemTime) -> String {
    let time = crate::report::rfc3339(at).replace(['-', ':'], "");
    format!("{PREFIX}{seq:08}-{time}")
}

/// The sequence number of a snapshot's file (any of its formats).
fn seq_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits = rest.split('-').next()?;
    (digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The JSON snapshots in `names`, oldest first, by sequence number.
fn json_snapshots(names: &[String]) -> Vec<(u64, &str)> {
    let mut out: Vec<(u64, &str)> = names
        .iter()
        .filter(|n| n.ends_with(".json"))
        .filter_map(|n| Some((seq_of(n)?, n.as_str())))
        .collect();
    out.sort();
    out
}

/// The files of the snapshots older than the newest `keep` (each snapshot
/// by its sequence number, whatever its formats).
fn to_remove(names: &[String], keep: usize) -> Vec<&str> {
    let seqs: Vec<u64> = json_snapshots(names).iter().map(|(s, _)| *s).collect();
    let Some(&oldest_kept) = seqs.len().checked_sub(keep).and_then(|i| seqs.get(i)) else {
        return Vec::new();
    };
    names
        .iter()
        .filter(|n| seq_of(n).is_some_and(|s| s < oldest_kept))
        .map(String::as_str)
        .collect()
}

/// The two newest JSON snapshots in `dir`, older first: what `memtrace diff
/// DIR` compares.
pub fn newest_two(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let names = file_names(dir)?;
    let snaps = json_snapshots(&names);
    match snaps.as_slice() {
        [.., (_, old), (_, new)] => Ok((dir.join(old), dir.join(new))),
        _ => bail!(
            "{} holds {} JSON snapshot{} ({PREFIX}*.json): a diff needs two",
            dir.display(),
            snaps.len(),
            if snaps.len() == 1 { "" } else { "s" }
        ),
    }
}

/// The file name extension of a snapshot in `format`.
fn extension(format: Format) -> &'static str {
    match format {
        Format::Json => "json",
        Format::Pprof => "pb.gz",
        Format::Folded => "folded",
        Format::Svg => "svg",
        Format::Text => "txt",
    }
}

/// The writer thread's side.
struct Writer {
    dir: PathBuf,
    keep: usize,
    /// JSON last.
    formats: Vec<Format>,
    stats: Arc<Mutex<SnapshotStats>>,
    in_flight: Arc<AtomicBool>,
}

impl Writer {
    fn write(&self, job: Job) {
        let result = self.write_files(&job);
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => stats.written += 1,
            Err(e) => fail(&mut stats, &job.stem, &e),
        }
        drop(stats);
        // Dropped here, on this thread: freeing a large report takes time.
        drop(job);
        if let Err(e) = self.rotate() {
            log::warn!("removing old snapshots in {}: {e:#}", self.dir.display());
        }
        self.in_flight.store(false, Ordering::Release);
    }

    /// Writes every format of the snapshot, or none: on an error, the files
    /// written for it are removed.
    fn write_files(&self, job: &Job) -> Result<()> {
        let mut written = Vec::new();
        for &format in &self.formats {
            let name = format!("{}.{}", job.stem, extension(format));
            match self.write_one(&job.report, format, &name) {
                Ok(()) => written.push(name),
                Err(e) => {
                    for name in written {
                        let _ = std::fs::remove_file(self.dir.join(name));
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// One file, under a temporary name, then renamed into place.
    fn write_one(&self, report: &Report, format: Format, name: &str) -> Result<()> {
        let final_path = self.dir.join(name);
        let temp = self.dir.join(format!(
            "{TEMP_PREFIX}{}",
            name.strip_prefix(PREFIX).unwrap_or(name)
        ));
        let result = (|| -> std::io::Result<()> {
            let file = File::create(&temp)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 16, file);
            emit(report, format, crate::report::TextStyle::top(0), &mut w)?;
            w.flush()?;
            // On disk before the name is: a crash leaves the old snapshot or
            // the whole new one, never an empty file under the final name.
            w.get_ref().sync_data()?;
            std::fs::rename(&temp, &final_path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result.with_context(|| format!("writing {}", final_path.display()))
    }

    fn rotate(&self) -> Result<()> {
        let names = file_names(&self.dir)?;
        for name in to_remove(&names, self.keep) {
            std::fs::remove_file(self.dir.join(name))
                .with_context(|| format!("removing {name}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_sort_in_the_order_taken() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        assert_eq!(stem(7, t), "snapshot-00000007-20261130T005320Z");
        assert_eq!(seq_of("snapshot-00000007-20261130T013320Z.pb.gz"), Some(7));
        assert_eq!(
            seq_of("snapshot-123456789-20261130T013320Z.json"),
            Some(123456789)
        );
        for other in [
            "snapshot-7-x.json",
            "report.json",
            ".snapshot-00000007-x.json",
            "snapshot-",
        ] {
            assert_eq!(seq_of(other), None, "{other}");
        }
        // Numerically, not as text: past eight digits, and whatever the clock said.
        let n = names(&[
            "snapshot-100000000-20200101T000000Z.json",
            "snapshot-99999999-20301231T000000Z.json",
            "notes.json",
        ]);
        let snaps = json_snapshots(&n);
        assert_eq!(
            snaps.iter().map(|s| s.0).collect::<Vec<_>>(),
            [99999999, 100000000]
        );
    }

    #[test]
    fn rotation_keeps_the_newest_snapshots_whole() {
        let n = names(&[
            "snapshot-00000001-a.json",
            "snapshot-00000001-a.pb.gz",
            "snapshot-00000002-b.json",
            "snapshot-00000002-b.pb.gz",
            "snapshot-00000003-c.json",
            "snapshot-00000003-c.pb.gz",
            "other.json",
            ".memtrace.lock",
        ]);
        let mut gone = to_remove(&n, 2);
        gone.sort();
        assert_eq!(
            gone,
            ["snapshot-00000001-a.json", "snapshot-00000001-a.pb.gz"]
        );
        assert!(to_remove(&n, 3).is_empty());
        assert!(to_remove(&n, 5).is_empty());
        // A pprof file whose JSON never came (the run was killed) goes with its time.
        let n = names(&["snapshot-00000001-a.pb.gz", "snapshot-00000002-b.json"]);
        assert_eq!(to_remove(&n, 1), ["snapshot-00000001-a.pb.gz"]);
    }

    #[test]
    fn diff_takes_the_two_newest() {
        let dir = crate::testutil::TempDir::new("snapshots");
        let err = newest_two(dir.path()).unwrap_err().to_string();
        assert!(err.contains("holds 0 JSON snapshots"), "{err}");
        for name in [
            "snapshot-00000009-x.json",
            "snapshot-00000010-x.json",
            "snapshot-00000011-x.pb.gz",
            "snapshot-00000008-x.json",
        ] {
            std::fs::write(dir.path().join(name), "{}").unwrap();
        }
        let (old, new) = newest_two(dir.path()).unwrap();
        assert_eq!(old, dir.path().join("snapshot-00000009-x.json"));
        assert_eq!(new, dir.path().join("snapshot-00000010-x.json"));
    }

    #[test]
    fn one_run_at_a_time_and_numbers_go_on() {
        let dir = crate::testutil::TempDir::new("snapshots");
        std::fs::write(dir.path().join("snapshot-00000041-x.json"), "{}").unwrap();
        std::fs::write(dir.path().join(".snapshot-00000042-x.json"), "{").unwrap();
        let opts = SnapshotOptions {
            every: Duration::from_secs(1),
            dir: dir.path().into(),
            keep: 3,
        };
        let mut first = Snapshots::open(&opts, vec![Format::Json]).unwrap();
        assert_eq!(first.next_seq, 42);
        assert!(!dir.path().join(".snapshot-00000042-x.json").exists());
        let err = Snapshots::open(&opts, vec![Format::Json]).err().unwrap();
        assert!(format!("{err:#}").contains("another memtrace"), "{err:#}");
        let (stats, note) = first.finish(Duration::from_secs(5));
        assert_eq!((stats.written, stats.failed, stats.keep), (0, 0, 3));
        assert!(note.is_none());
    }
}
