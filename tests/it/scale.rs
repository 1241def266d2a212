//! The final report at scale: a million outstanding blocks over ten thousand
//! stacks (fixture `scale`). Asserts exact totals; the costs (report CPU, map
//! reads, memtrace's peak RSS) are printed with eprintln!, never asserted:
//! run with `--nocapture` to see them.
//!
//! `MEMTRACE_SCALE_COMPARE=1` also runs the same trace with
//! `MEMTRACE_NO_BATCH=1` (aya's per-entry map iteration) for the comparison;
//! off by default, as it doubles the test's ~30 s.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use memtrace_tests::*;
use serde_json::Value;

const BLOCKS: u64 = 1_000_000;
const SITES: u64 = 10_000;
const BLOCK_SIZE: u64 = 16;

/// A memtrace process reaped with wait4 (for its rusage), killed if the test
/// fails before.
struct Traced {
    child: Child,
    reaped: bool,
    log: PathBuf,
}

impl Traced {
    fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// waitpid(WNOHANG): the exit status and rusage once it has exited.
    fn try_reap(&mut self) -> Option<(i32, libc::rusage)> {
        let mut status = 0;
        // SAFETY: zeroed rusage is a valid out-value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: valid out-pointers for the status and rusage; our own child.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        assert!(rc >= 0, "wait4: {}", std::io::Error::last_os_error());
        if rc == pid {
            self.reaped = true;
            Some((status, ru))
        } else {
            None
        }
    }

    fn wait_attached(&mut self) {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while !self
            .stderr()
            .lines()
            .any(|l| l.starts_with("memtrace: attached"))
        {
            if let Some((st, _)) = self.try_reap() {
                panic!(
                    "memtrace exited (wait status {st:#x}) before attaching; stderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "memtrace did not attach within {ATTACH_TIMEOUT:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for memtrace to exit: its wait status, rusage and peak RSS in KiB
    /// (VmHWM, read until it is gone: wait4's ru_maxrss would count the forked
    /// copy of this test process before exec).
    fn wait_exit(&mut self, mut peak_kib: i64) -> (i32, libc::rusage, i64) {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let pid = self.child.id();
        loop {
            if let Some(h) = fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .as_deref()
                .and_then(hwm_kib)
            {
                peak_kib = peak_kib.max(h);
            }
            if let Some((status, ru)) = self.try_reap() {
                return (status, ru, peak_kib);
            }
            assert!(
                Instant::now() < deadline,
                "memtrace did not exit within {EXIT_TIMEOUT:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tv(t: libc::timeval) -> Duration {
    Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000)
}

/// utime + stime of a live process (all its threads), from /proc/PID/stat.
fn proc_cpu(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc/PID/stat");
    // The fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf takes a plain name and has no other preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// Peak RSS so far (VmHWM) of a live process, in KiB.
fn proc_hwm_kib(pid: u32) -> i64 {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    hwm_kib(&status).expect("VmHWM in /proc/PID/status")
}

/// VmHWM of the text of /proc/PID/status (none once the process is a zombie).
fn hwm_kib(status: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The `read MAP: ...` debug lines of memtrace's stderr (see collect.rs).
fn map_reads<'a>(stderr: &'a str, map: &str) -> Vec<&'a str> {
    let needle = format!("read {map}: ");
    stderr
        .lines()
        .filter_map(|l| l.find(&needle).map(|i| &l[i..]))
        .collect()
}

struct Measured {
    report: Report,
    alloc_phase: Duration,
    report_wall: Duration,
    report_cpu: Duration,
    total_cpu: Duration,
    max_rss_kib: i64,
    /// Peak RSS before the report.
    traced_rss_kib: i64,
    allocs_read: String,
    sites_read: String,
}

/// `ages`: MEMTRACE_AGES for the run (None: memtrace's own choice).
fn trace_scale(fixture: &Path, no_batch: bool, ages: Option<&str>) -> Measured {
    let mut target = TestProcess::spawn_ready(fixture, &[]);
    let out = unique_path("json");
    let log = unique_path("log");
    let mut cmd = memtrace_command();
    // No live sample (and so no second birth epoch) while the blocks are
    // allocated, however slow the machine: check_epoch_ages counts on one.
    cmd.args(["-f", "json", "--interval", "60s", "-o"])
        .arg(&out)
        .arg("--pid")
        .arg(target.pid().to_string())
        .env("MEMTRACE_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("creating the log file"));
    if no_batch {
        cmd.env("MEMTRACE_NO_BATCH", "1");
    } else {
        cmd.env_remove("MEMTRACE_NO_BATCH");
    }
    match ages {
        Some(a) => cmd.env("MEMTRACE_AGES", a),
        None => cmd.env_remove("MEMTRACE_AGES"),
    };
    let mut m = Traced {
        child: cmd.spawn().expect("spawning memtrace"),
        reaped: false,
        log: log.clone(),
    };
    m.wait_attached();

    let go = Instant::now();
    target.go();
    let tally = target.wait_done();
    let alloc_phase = go.elapsed();
    assert_eq!(tally.get("alloc_calls"), BLOCKS);
    assert_eq!(tally.get("failed"), 0);
    assert_eq!(tally.get("sites"), SITES);

    // Everything memtrace does from here on is the report (and the detach).
    let cpu_before = proc_cpu(m.child.id());
    let traced_rss_kib = proc_hwm_kib(m.child.id());
    let stop = Instant::now();
    send_signal(m.child.id(), libc::SIGINT);
    let (status, ru, peak_kib) = m.wait_exit(traced_rss_kib);
    let report_wall = stop.elapsed();
    let stderr = m.stderr();
    assert_no_panic(&stderr);
    assert!(
        libc::WIFEXITED(status),
        "memtrace ended by signal, wait status {status:#x}; stderr:\n{stderr}"
    );
    let total_cpu = tv(ru.ru_utime) + tv(ru.ru_stime);

    let text = fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("no report at {}: {e}; stderr:\n{stderr}", out.display()));
    let value: Value = serde_json::from_str(&text).expect("the report is JSON");
    let _ = fs::remove_file(&out);
    let last = |map: &str| {
        map_reads(&stderr, map)
            .last()
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("(no `read {map}` debug line)"))
    };
    let measured = Measured {
        report: Report(value),
        alloc_phase,
        report_wall,
        report_cpu: total_cpu.saturating_sub(cpu_before),
        total_cpu,
        max_rss_kib: peak_kib,
        traced_rss_kib,
        allocs_read: last("ALLOCS"),
        sites_read: last("SITES"),
    };
    let _ = fs::remove_file(&log);
    target.finish_unharmed();
    measured
}

fn check_totals(r: &Report, what: &str) {
    let totals = r.totals();
    assert_eq!(r.total("outstanding_blocks"), BLOCKS, "{what}: {totals}");
    assert_eq!(
        r.total("outstanding_bytes"),
        BLOCKS * BLOCK_SIZE,
        "{what}: {totals}"
    );
    assert_eq!(r.total("alloc_calls"), BLOCKS, "{what}: {totals}");
    assert_eq!(r.total("sites_seen"), SITES, "{what}: {totals}");
    assert_eq!(r.total("dropped_events"), 0, "{what}: {totals}");
    // --min-age 0s: every site is a leak candidate, and the JSON lists them all.
    let sites = r.sites();
    assert_eq!(sites.len() as u64, SITES, "{what}: sites in the report");
    let blocks: u64 = sites.iter().map(Report::blocks).sum();
    assert_eq!(blocks, BLOCKS, "{what}: blocks summed over the sites");
    assert!(
        sites.iter().all(|s| Report::blocks(s) == BLOCKS / SITES),
        "{what}: every site holds {} blocks",
        BLOCKS / SITES
    );
}

/// A million blocks are too many to read one by one for the report: the ages
/// come from the per-site, per-epoch aggregates (one entry per site here, as
/// every block is born before the first sample), and ALLOCS is never read.
fn check_epoch_ages(m: &Measured) {
    let r = &m.report;
    assert_eq!(r.0["ages_from"], "epochs", "{}", r.totals());
    assert!(
        m.allocs_read.starts_with("(no `read ALLOCS`"),
        "the report read every block: {}",
        m.allocs_read
    );
    assert!(
        m.sites_read
            .contains(&format!("read SITES: {SITES} entries")),
        "one SITES entry per site: {}",
        m.sites_read
    );
    let duration = r.0["duration_s"].as_f64().unwrap();
    for s in r.sites() {
        let (oldest, median) = (
            s["oldest_age_s"].as_f64().unwrap(),
            s["median_age_s"].as_f64().unwrap(),
        );
        assert!(
            oldest > 0.0 && oldest <= duration + 0.1 && oldest == median,
            "one epoch per site: oldest {oldest} s = median {median} s, at most the run ({duration} s)"
        );
    }
}

fn print(label: &str, m: &Measured) {
    eprintln!(
        "scale [{label}]: allocation phase {:.1} s; report: {:.0} ms wall, {:.0} ms CPU \
         (memtrace total CPU {:.2} s); max RSS {:.1} MiB ({:.1} MiB before the report)",
        m.alloc_phase.as_secs_f64(),
        m.report_wall.as_secs_f64() * 1e3,
        m.report_cpu.as_secs_f64() * 1e3,
        m.total_cpu.as_secs_f64(),
        m.max_rss_kib as f64 / 1024.0,
        m.traced_rss_kib as f64 / 1024.0,
    );
    eprintln!("scale [{label}]: last {}", m.allocs_read);
    eprintln!("scale [{label}]: last {}", m.sites_read);
}

#[test]
fn million_blocks_over_ten_thousand_stacks() {
    require_root();
    require_memtrace();
    let fixture = build_fixture("scale", Variant::FramePointers);

    let batched = trace_scale(&fixture, false, None);
    print("batch", &batched);
    check_totals(&batched.report, "batch");
    assert!(
        batched.sites_read.contains("(batch)"),
        "the final read of SITES used BPF_MAP_LOOKUP_BATCH: {}",
        batched.sites_read
    );
    check_epoch_ages(&batched);

    if std::env::var_os("MEMTRACE_SCALE_COMPARE").is_some_and(|v| v != "0") {
        let per_entry = trace_scale(&fixture, true, None);
        print("per entry", &per_entry);
        check_totals(&per_entry.report, "per entry");
        assert!(
            per_entry.sites_read.contains("(per entry)"),
            "MEMTRACE_NO_BATCH=1 reads entry by entry: {}",
            per_entry.sites_read
        );
        check_epoch_ages(&per_entry);
    }
}

/// The same million blocks with every block scanned for the ages (as the
/// live samples do below 200,000 blocks): the scan reads the block table
/// through windows of its mapped arrays, and must find each block once.
#[test]
fn a_scan_of_a_million_blocks_finds_each_once() {
    require_root();
    require_memtrace();
    let fixture = build_fixture("scale", Variant::FramePointers);
    let m = trace_scale(&fixture, false, Some("blocks"));
    print("scan", &m);
    check_totals(&m.report, "scan");
    assert_eq!(m.report.0["ages_from"], "blocks", "{}", m.report.totals());
    assert!(
        m.allocs_read
            .starts_with(&format!("read ALLOCS: {BLOCKS} entries")),
        "the final scan read every block once: {}",
        m.allocs_read
    );
    assert!(m.allocs_read.contains("(mmap)"), "{}", m.allocs_read);
    let duration = m.report.0["duration_s"].as_f64().unwrap();
    for s in m.report.sites() {
        let (oldest, median) = (
            s["oldest_age_s"].as_f64().unwrap(),
            s["median_age_s"].as_f64().unwrap(),
        );
        assert!(
            oldest > 0.0 && median > 0.0 && median <= oldest && oldest <= duration + 0.1,
            "ages from the blocks: median {median} s <= oldest {oldest} s <= the run ({duration} s)"
        );
    }
}
